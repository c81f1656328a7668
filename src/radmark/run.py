"""Entry point: ``python -m radmark.run +experiment=NAME [overrides]``.

Composes the Hydra config and hands it to :func:`radmark.pipeline.run_experiment`; no logic lives here.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import radmark.config  # noqa: F401  (registers the schema in Hydra's ConfigStore)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from radmark.pipeline import run_experiment

    metrics = run_experiment(cfg)
    # Returned so Hydra sweepers that optimise a value can use it.
    value = metrics.get("detect/whitebox_log10_p")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
