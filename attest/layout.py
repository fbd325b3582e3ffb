"""The layout of a run directory, which is also the layout of its bundle (a bundle holds a run's signed
files at the same relative paths). docs/bundle-format.md "Layout" describes it; every module that
names one of these paths takes it from here.

    chain.jsonl                                         the signed, hash-linked chain
    keys/signing-key.pem, keys/signing-key.pub.pem      a PEM signing key pair (the private key stays with the team)
    config/run.yaml                                     the canonical rendering of the signed run config
    checkpoints/step-NNNNNN/{model,optimizer}-RRRRR-of-WWWWW.safetensors   each rank's share of a checkpoint
    .provenance/step-NNNNNN/rank-RRRRR.json             a rank's digests of its share (run directory only)
    export/                                             the released model folder (transformers loads it)
    export/llama/                                       its text decoder as a standard Llama folder (no remote code)
    release.slsa.json                                   SLSA Provenance of the release
"""

from __future__ import annotations

CHAIN_NAME = "chain.jsonl"
KEYS_DIR = "keys"
PRIVATE_KEY_NAME = "signing-key.pem"
PUBLIC_KEY_NAME = "signing-key.pub.pem"
CONFIG_NAME = "config/run.yaml"
SLSA_NAME = "release.slsa.json"
EXPORT_DIR = "export"  # the folder a user loads; kai_train.export writes it, the release names every file of it
EXPORT_LLAMA_DIR = "llama"  # inside export/: the text decoder as a Llama folder (attest.llama), export format 3 on
# What transformers runs with trust_remote_code from export/: these files, byte for byte this
# package's (kai_train/), named by these auto_maps; the release check holds every export to them.
EXPORT_CODE_FILES = ("modeling_kai.py", "model.py", "modelspec.py", "tokenization_kai.py")
EXPORT_AUTO_MAP = {"AutoConfig": "modeling_kai.KaiConfig", "AutoModelForCausalLM": "modeling_kai.KaiForCausalLM"}
EXPORT_TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_kai.KaiTokenizer", None]}
CHECKPOINTS_DIR = "checkpoints"
SIDECARS_DIR = ".provenance"
_STEP = "step-"


def checkpoint_dir(step: int) -> str:
    """`checkpoints/step-NNNNNN`: the folder of the checkpoint after optimizer step `step` (0: the genesis)."""
    return f"{CHECKPOINTS_DIR}/{_STEP}{step:06d}"


def checkpoint_step(folder_name: str) -> int | None:
    """The step a `step-NNNNNN` folder name stands for; None for any other name."""
    digits = folder_name.removeprefix(_STEP)
    return int(digits) if digits != folder_name and digits.isdigit() else None


def checkpoint_shard(step: int, kind: str, rank: int, world: int) -> str:
    """Rank `rank`'s share of a checkpoint; `kind` is "model" or "optimizer"."""
    return f"{checkpoint_dir(step)}/{kind}-{rank:05d}-of-{world:05d}.safetensors"


def sidecar(step: int, rank: int) -> str:
    """Where rank `rank` records the digests of its share of step `step` (read by rank 0's provenance worker)."""
    return f"{SIDECARS_DIR}/{_STEP}{step:06d}/rank-{rank:05d}.json"
