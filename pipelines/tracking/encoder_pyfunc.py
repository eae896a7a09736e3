"""The registered encoder as an MLflow pyfunc, logged as code (MLflow "models from code").

This file is copied into the logged model and executed when the model loads; `xtra_core` travels
with it (`code_paths`), so loading needs only the model's declared requirements (torch,
safetensors, numpy, mlflow): nothing of ours is pickled and this repository need not be installed.

    model = mlflow.pyfunc.load_model("models:/xtra-encoder@champion")
    features = model.predict(images)                       # float32 [B, 3, H, W] -> [B, D]
    features = model.predict(images, params={"last_n": 6})  # mean of the last 6 blocks' outputs

Images are normalised as in pretraining ((x/255 - mean) / std, see `normalization` in
`artifacts/export/config.json`); features are the token mean of the encoder's output.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

EXPORT_ARTIFACT = "export"


class XTRAEncoderModel(PythonModel):
    """float32 images [B, C, H, W] (normalised) -> token-mean features [B, D]."""

    def load_context(self, context) -> None:  # noqa: ANN001
        from xtra_core.export import load_encoder  # from the model's code/ directory

        self.encoder = load_encoder(context.artifacts[EXPORT_ARTIFACT])

    # np.ndarray: MLflow infers no schema from it (the logged signature is explicit) and does not
    # warn that the input is untyped
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:  # noqa: ANN001
        import torch

        last_n = int((params or {}).get("last_n", 1))
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.encoder(x, last_n=last_n).mean(1).numpy()  # [B, N, D] -> [B, D]


mlflow.models.set_model(XTRAEncoderModel())
