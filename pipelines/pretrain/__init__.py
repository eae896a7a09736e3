"""Pretraining: `driver.run_pretraining(cfg)` on the driver, `trainer` on the Ray Train workers."""
