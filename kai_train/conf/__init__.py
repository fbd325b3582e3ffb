"""The Hydra configs of `kai-train` and `kai-data`, installed with the package.

Found through Hydra's search path as `pkg://kai_train.conf`; `--config-dir DIR` adds a user's own
folder in front of it (e.g. `DIR/data/NAME.yaml`). `kai_train.schema` types every key.
"""
