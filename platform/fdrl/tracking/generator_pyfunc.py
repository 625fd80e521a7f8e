"""The MLflow "model from code" of a registered generator (see ``fdrl.tracking.generators``).

    model = mlflow.pyfunc.load_model("models:/gan-25gaussians@candidate")
    x = model.predict(pd.DataFrame({"n": [16], "seed": [0]}))

Each row asks for ``n`` unrefined samples g(z) with ``seed``; z is drawn per chunk of 64 from the
chunk's seed, as refinement draws its base samples. Refinement itself is ``jobs/refine.py``.
"""

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class GeneratorSampler(PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from safetensors.torch import load_file

        from fdrl.core.generator_model import build_generator

        a = context.artifacts
        config = json.loads(Path(a["generator.json"]).read_text())
        weights = {role: load_file(a[f"{role}.safetensors"]) for role in config["nets"]}
        self.model = build_generator(config, weights)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        import torch

        from fdrl.core.dgflow import Pushforward
        from fdrl.core.chunks import chunk_seed, chunks

        m = self.model
        prior = Pushforward(m.generator, m.latent_dim, m.data_shape)
        out = []
        for row in pd.DataFrame(model_input).to_dict("records"):
            for index, _, size in chunks(int(row["n"])):
                gen = torch.Generator().manual_seed(chunk_seed(int(row["seed"]), index))
                out.append(prior.sample(size, gen).numpy())
        return np.concatenate(out).astype(np.float32)


mlflow.models.set_model(GeneratorSampler())
