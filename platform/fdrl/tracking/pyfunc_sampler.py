"""The MLflow "model from code" of a registered FDRL model (see ``fdrl.registry``).

MLflow copies this file into the model and runs it when the model is loaded with
``mlflow.pyfunc.load_model``; ``set_model`` below names the model object. The weights, prior and
config are the model's artifacts, read with safetensors and JSON.

    model = mlflow.pyfunc.load_model("models:/fdrl-mnist@champion")
    x = model.predict(pd.DataFrame({"n": [16], "seed": [0]}), params={"extra_steps": 20})

Each input row asks for ``n`` samples with ``seed``; the rows' samples are concatenated into one
(N, C, H, W) float32 array in [-1, 1]. Params: flow_steps, extra_steps, eta, nu (defaults: the
training config) and batch (chunk size). For the same seed and batch the samples equal those of
``jobs/sample.py`` (same chunk seeds), up to thread-count rounding on CPU.
"""

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class FDRLSampler(PythonModel):
    def load_context(self, context):
        from fdrl.tracking.registry import CONFIG, PRIOR, WEIGHTS, build_model_from_files

        a = context.artifacts  # keyed by file name
        self.net, self.prior, self.config = build_model_from_files(a[WEIGHTS], a.get(PRIOR), a[CONFIG])

    # A DataFrame hint: MLflow keeps the explicit signature (n, seed) instead of inferring one.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from fdrl.core.divergences import get_pairing
        from fdrl.core.flow import FlowSettings
        from fdrl.core.chunks import CHUNK
        from fdrl.core.sampler import sample

        if self.prior is None:  # a translation model: its prior is the source images
            raise ValueError("a translation model samples only from given source images: "
                             "use jobs/sample.py --input")
        params = dict(params or {})
        chunk = int(params.pop("batch", None) or CHUNK)
        flow = FlowSettings.from_config(self.config, **params)
        pairing = get_pairing(self.config.pairing)
        rows = pd.DataFrame(model_input).to_dict("records")
        return np.concatenate([
            sample(self.net, pairing, flow, int(row["n"]), int(row["seed"]), prior=self.prior,
                   chunk=chunk).x.clamp(-1, 1).numpy() for row in rows])


mlflow.models.set_model(FDRLSampler())
