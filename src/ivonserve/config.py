"""Every server setting in one place: environment (``IVONSERVE_*``), then CLI flags on top.

``Settings`` is the single object the server, the engine and the tests read. Each field becomes
one ``ivonserve serve`` flag (``--pool-size`` for ``pool_size``) whose help text is the field's
description, and one environment variable (``IVONSERVE_POOL_SIZE``). A flag given on the command
line overrides the environment; a flag left out keeps the environment's (or the default) value.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ivonserve.errors import IvonserveError

DEFAULT_POSTERIOR = "posteriors/smollm2-135m-gsm8k"
ENV_PREFIX = "IVONSERVE_"
_NONE_WORDS = {"none", "null", ""}


def repo_root() -> Path:
    """The checkout this package runs from (src layout: src/ivonserve/config.py -> repo root)."""
    return Path(__file__).resolve().parents[2]


def default_posterior() -> Path:
    """``posteriors/smollm2-135m-gsm8k`` under the working directory when it is there, else under
    the repository this package was installed from, so ``make serve`` works from any directory."""
    here = Path.cwd() / DEFAULT_POSTERIOR
    return here if here.is_dir() else repo_root() / DEFAULT_POSTERIOR


class Settings(BaseSettings):
    """ivonserve's settings. Environment variables: ``IVONSERVE_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    # --- HTTP -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn's log level"
    )

    # --- model and posterior --------------------------------------------------------------------
    model: str | None = Field(
        None, description="base model: a transformers folder (default: the embedded SmolLM2-135M)"
    )
    cache_dir: Path | None = Field(
        None, description="where the embedded model is converted to (default: ~/.cache/ivonserve)"
    )
    posterior: Path = Field(
        default_factory=default_posterior,
        description=f"IVON posterior folder to serve (default: the repo's {DEFAULT_POSTERIOR})",
    )
    adapter: Path | None = Field(
        None,
        description="serve a plain PEFT adapter (e.g. `ivonserve train --optimizer adamw`) as a "
        "zero-variance posterior instead of --posterior: every draw is the adapter itself",
    )
    posterior_name: str | None = Field(
        None,
        description="name of the posterior in /v1/models and the request's `model` "
        "(default: the folder's name)",
    )

    # --- the pool of draws --------------------------------------------------------------------
    pool_size: int = Field(8, ge=1, le=256, description="K: posterior draws loaded as LoRA slots")
    pool_seed: int = Field(0, ge=0, description="seed of the pool (same seed: same draws anywhere)")
    sampling_temperature: float = Field(
        1.0, ge=0, description="posterior temperature T: draws use variance T*sigma^2 (0: the mean)"
    )
    prune: float = Field(
        0.1, ge=0, lt=1, description="fraction of LoRA entries zeroed by uncertainty (0: none)"
    )
    prune_by: Literal["variance", "snr"] = Field(
        "variance", description="what pruning ranks by: highest variance, or lowest |m|/sigma"
    )

    # --- request defaults and limits ------------------------------------------------------------
    max_candidates: int = Field(
        64, ge=1, description="most candidates one request may ask for: max(1,n_models)*n_samples"
    )
    default_n_models: int = Field(
        4, ge=0, description="n_models when a request leaves it out (capped at pool_size)"
    )
    default_n_samples: int = Field(4, ge=1, description="n_samples when a request leaves it out")
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens when a request leaves it out"
    )
    max_tokens_limit: int = Field(
        1024, ge=1, description="largest max_tokens a request may ask for"
    )
    default_temperature: float = Field(
        0.7, ge=0, description="decoding temperature when a request leaves it out (0: greedy)"
    )
    default_top_p: float = Field(1.0, gt=0, le=1, description="top_p when a request leaves it out")
    default_selection: str = Field(
        "model", description="selection method when a request leaves it out (see mbr.METHODS)"
    )
    default_utility: str = Field(
        "answer", description="MBR utility when a request leaves it out (see mbr.UTILITIES)"
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="a /generate taking longer is aborted and answered 504"
    )

    # --- vLLM engine (passed through) --------------------------------------------------------
    dtype: str | None = Field(
        None,
        description="model dtype (default: float32 on the CPU, for exact parity with "
        "peft+transformers; vLLM's 'auto' on a GPU)",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length (default: the model's own)"
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="KV cache size in GiB (default: 1 on the CPU; on a GPU vLLM sizes it from "
        "gpu_memory_utilization)",
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="fraction of accelerator memory vLLM may use (vLLM default)"
    )
    block_size: int | None = Field(
        None, ge=1, description="KV cache block size (default: 32 on the CPU, vLLM's on a GPU)"
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="most sequences vLLM batches at once (vLLM default)"
    )
    enforce_eager: bool = Field(False, description="disable graph capture / compilation")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallel size")
    data_parallel_size: int = Field(1, ge=1, description="vLLM data parallel size")
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(
        None, description="vLLM distributed executor backend (vLLM's choice by default)"
    )

    @field_validator("default_selection")
    @classmethod
    def _known_selection(cls, value: str) -> str:
        from ivonserve import mbr

        if value not in mbr.METHODS:
            raise ValueError(
                f"unknown selection {value!r}; valid: {', '.join(sorted(mbr.METHODS))}"
            )
        return value

    @field_validator("default_utility")
    @classmethod
    def _known_utility(cls, value: str) -> str:
        from ivonserve import mbr

        if value not in mbr.UTILITIES:
            raise ValueError(
                f"unknown utility {value!r}; valid: {', '.join(sorted(mbr.UTILITIES))}"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit "
                f"({self.max_tokens_limit})"
            )
        if self.default_n_samples > self.max_candidates:
            raise ValueError(
                f"default_n_samples ({self.default_n_samples}) exceeds max_candidates "
                f"({self.max_candidates})"
            )
        return self

    @property
    def served_name(self) -> str:
        """The posterior's name in /v1/models and in a request's `model` field."""
        return self.posterior_name or Path(self.adapter or self.posterior).name

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> Settings:
        """Settings from the environment with the flags given on the command line on top."""
        given = {
            name: _from_flag(value)
            for name in cls.model_fields
            if (value := getattr(args, name, None)) is not None
        }
        return cls.build(**given)

    @classmethod
    def build(cls, **values: Any) -> Settings:
        """``Settings(...)``, but a bad value is a one-line IvonserveError naming the setting."""
        try:
            return cls(**values)
        except ValidationError as err:
            first = err.errors()[0]
            name = ".".join(str(p) for p in first["loc"]) or "settings"
            flag = "--" + name.replace("_", "-")
            raise IvonserveError(
                f"setting {name} ({flag} / {ENV_PREFIX}{name.upper()}): {first['msg']}"
            ) from None

    def summary(self) -> str:
        """The settings as aligned ``name = value`` lines, for the start-up log."""
        width = max(len(n) for n in type(self).model_fields)
        return "\n".join(
            f"  {name:<{width}} = {getattr(self, name)!s}" for name in type(self).model_fields
        )


def _from_flag(value: Any) -> Any:
    """Flags arrive as strings; 'none' (any case) or '' clears an optional setting."""
    if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        return None
    return value


def _type_info(annotation: Any) -> tuple[str, list[str] | None, bool]:
    """(metavar, choices, optional) of a field's annotation, for argparse."""
    args = typing.get_args(annotation)
    optional = (
        typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    )
    inner = [a for a in args if a is not type(None)] if optional else [annotation]
    base = inner[0] if len(inner) == 1 else annotation
    if typing.get_origin(base) is Literal:
        choices = [str(c) for c in typing.get_args(base)]
        return "{" + ",".join(choices) + "}", choices, optional
    names = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", bool: "BOOL"}
    return names.get(base, "VALUE"), None, optional


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per Settings field; its help shows the description, default and env variable.

    Flags default to None (left out), so the environment and the field defaults stay in force
    for every flag not given.
    """
    group = parser.add_argument_group(
        "settings", f"every flag can also be set as an environment variable {ENV_PREFIX}<NAME>"
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"{ENV_PREFIX}{name.upper()}"
        default = field.get_default(call_default_factory=True)
        shown = "" if "default:" in (field.description or "") else f"default: {default}; "
        help_text = f"{field.description} [{shown}env {env}]".replace("%", "%%")
        if field.annotation is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        metavar, choices, optional = _type_info(field.annotation)
        if optional and choices:
            choices = [*choices, "none"]
        group.add_argument(
            flag, dest=name, default=None, metavar=metavar, choices=choices, help=help_text
        )
    return parser
