"""Pictures of what XTRA learned (the paper's Figure 4) and of its block-causal mask."""
