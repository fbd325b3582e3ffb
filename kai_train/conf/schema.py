"""Typed schemas of the `kai-train` and `kai-data` configs, registered in Hydra's ConfigStore.

The YAML files next to this module hold every default; these dataclasses hold only the keys and
their types (every field is MISSING here), so Hydra rejects `seed=abc`, `train.stpes=5` or a preset
with a misspelt key while it composes the config: before anything is signed, and on every torchrun
worker before it starts any work. The model schema is derived from `kai_train.modelspec.ModelConfig`
(one list of model fields). `deepspeed` stays free-form: DeepSpeed validates its own config.

    train.yaml     defaults: [train_schema, ...]      kai_data.yaml  defaults: [kai_data_schema, ...]
    attest/pem.yaml    defaults: [pem_schema]         attest/pkcs11.yaml  defaults: [pkcs11_schema]
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from kai_train.modelspec import ModelConfig

ModelSchema = dataclasses.make_dataclass(
    "ModelSchema",
    [(f.name, t, field(default=MISSING)) for f, t in
     ((f, typing.get_type_hints(ModelConfig)[f.name]) for f in dataclasses.fields(ModelConfig))],
)


@dataclass
class TrainSchema:
    steps: int = MISSING
    micro_batch: int = MISSING
    grad_accum: int = MISSING
    text_len: int = MISSING
    lr: float = MISSING
    betas: List[float] = MISSING
    weight_decay: float = MISSING
    schedule: str = MISSING
    warmup: int = MISSING
    min_lr_ratio: float = MISSING
    decay_frac: float = MISSING
    grad_clip: float = MISSING
    activation_checkpointing: bool = MISSING
    holdout_every: int = MISSING
    eval_every: int = MISSING
    eval_batches: int = MISSING
    log_every: int = MISSING
    ckpt_every: int = MISSING
    stop_at: Optional[int] = MISSING
    expert_parallel: int = 1  # ranks the routed experts are split over (kai_train.expert_parallel)


@dataclass
class WandbSchema:
    mode: str = MISSING
    project: str = MISSING


@dataclass
class AttestCommon:
    backend: str = MISSING
    tsa_url: Optional[str] = MISSING
    tsa_timeout_s: float = MISSING
    optimizer_state: bool = MISSING
    background: bool = MISSING


@dataclass
class PemSchema(AttestCommon):
    key: str = MISSING


@dataclass
class Pkcs11Schema(AttestCommon):
    uri: str = MISSING
    pin_env: Optional[str] = MISSING


@dataclass
class SamplerSchema:
    kind: str = MISSING
    mixture: Any = MISSING  # {source: whole weight} or null (checked by attest.sampling.check_mixture)


@dataclass
class TrainApp:
    """`kai-train` (kai_train/conf/train.yaml)."""

    run_id: str = MISSING
    run_dir: str = MISSING
    seed: Optional[int] = MISSING  # null: drawn from os.urandom when the run begins, then recorded
    data_dir: str = MISSING
    tokenizer: str = MISSING
    resume: str = MISSING
    determinism: str = "exact"  # exact | fast (kai_train.determinism)
    license: Optional[str] = None  # the released model's licence (SPDX id) for export/README.md
    wandb: WandbSchema = MISSING
    model: ModelSchema = MISSING  # type: ignore[valid-type]
    train: TrainSchema = MISSING
    sampler: SamplerSchema = MISSING
    deepspeed: Dict[str, Any] = MISSING
    attest: Any = MISSING


@dataclass
class ShardsSchema:
    rows: int = MISSING
    max_mb: float = MISSING


@dataclass
class NormalizeSchema:
    image_size: int = MISSING
    sample_rate: int = MISSING
    audio_samples: int = MISSING
    unicode: str = MISSING


@dataclass
class DedupSchema:
    exact: bool = MISSING
    near: bool = MISSING
    threshold: float = MISSING
    num_perm: int = MISSING
    shingle: int = MISSING
    seed: int = MISSING


@dataclass
class TokenizerSchema:
    vocab_size: int = MISSING
    every: int = MISSING
    max_sentences: Optional[int] = MISSING


@dataclass
class PackSchema:
    seq_len: int = MISSING


@dataclass
class SlurmSchema:
    partition: str = MISSING
    time: str = MISSING
    cpus_per_task: int = MISSING
    mem_per_cpu_gb: int = MISSING
    venv_path: Optional[str] = MISSING
    sbatch_args: Dict[str, Any] = MISSING  # any further #SBATCH option


@dataclass
class ExecutorSchema:
    kind: str = MISSING     # inline | local | slurm (data_pipelines.build)
    tasks: int = MISSING
    workers: int = MISSING
    slurm: SlurmSchema = MISSING


@dataclass
class KaiDataApp:
    """`kai-data` (kai_train/conf/kai_data.yaml). A data file (data/NAME.yaml) is the user's own:
    its sources are checked by data_pipelines.sources, its stage parameters by the stages."""

    run_id: str = MISSING
    out_dir: str = MISSING
    run_dir: str = MISSING
    tokenizer_prefix: str = MISSING
    jobs: int = MISSING
    progress: str = MISSING
    executor: ExecutorSchema = MISSING
    shards: ShardsSchema = MISSING
    normalize: NormalizeSchema = MISSING
    dedup: DedupSchema = MISSING
    tokenizer: TokenizerSchema = MISSING
    pack: PackSchema = MISSING
    data: Any = MISSING
    attest: Any = MISSING


def register() -> None:
    """Put the schemas where the configs' defaults lists find them (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainApp)
    cs.store(name="kai_data_schema", node=KaiDataApp)
    cs.store(group="attest", name="pem_schema", node=PemSchema)
    cs.store(group="attest", name="pkcs11_schema", node=Pkcs11Schema)
