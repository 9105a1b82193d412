"""Every server setting in one place: environment (``IVONSERVE_*``), then CLI flags on top.

``Settings`` is the single object the server, the engine and the tests read. Each field becomes
one ``ivonserve serve`` flag (``--pool-size`` for ``pool_size``) whose help text is the field's
description, and one environment variable (``IVONSERVE_POOL_SIZE``). A flag given on the command
line overrides the environment; a flag left out keeps the environment's (or the default) value.

A renamed setting (``RENAMED``: ``sampling_temperature`` is now ``posterior_temperature``) is
still accepted under its old name, as a flag, a variable or a config-file key, with a
deprecation warning in the log.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ivonserve.errors import IvonserveError
from ivonserve.pool import PosteriorSpec
from ivonserve.sampler import PruneBy, SamplerConfig

if typing.TYPE_CHECKING:
    from ivonserve.engine.args import EngineConfig

__all__ = [
    "DEFAULT_POSTERIOR",
    "RENAMED",
    "PosteriorSpec",
    "Settings",
    "add_cli_arguments",
    "repo_root",
]

logger = logging.getLogger("ivonserve.config")
DEFAULT_POSTERIOR = "posteriors/smollm2-135m-gsm8k-epoch"
ENV_PREFIX = "IVONSERVE_"
_NONE_WORDS = {"none", "null", ""}
# old name -> new name; the old one still works as a flag, variable or file key, with a warning
RENAMED = {"sampling_temperature": "posterior_temperature"}
SECRET_FIELDS = frozenset({"api_keys"})
_SAMPLER = SamplerConfig()  # the defaults of the draws: one source for settings, CLI and engine


def repo_root() -> Path:
    """The checkout this package runs from (src layout: src/ivonserve/config.py -> repo root)."""
    return Path(__file__).resolve().parents[2]


def default_posterior() -> Path:
    """``DEFAULT_POSTERIOR`` under the working directory when it is there, else under the
    repository this package was installed from, so ``make serve`` works from any directory."""
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
    config: Path | None = Field(
        None,
        description="a TOML or JSON file of settings (field names as keys); flags and "
        "environment variables override it",
    )
    model: str | None = Field(
        None, description="base model: a transformers folder (default: the embedded SmolLM2-135M)"
    )
    cache_dir: Path | None = Field(
        None, description="where the embedded model is converted to (default: ~/.cache/ivonserve)"
    )
    posterior: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="an IVON posterior to serve, as [NAME=]DIR (NAME: the folder's name by "
        "default); repeat the flag (or separate with commas) for several, each with its own pool; "
        f"the first answers requests that name no model (default: the repo's {DEFAULT_POSTERIOR} "
        "unless --adapter is given)",
    )
    adapter: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a plain PEFT adapter (e.g. `ivonserve train --optimizer adamw`) to serve as "
        "a zero-variance posterior, as [NAME=]DIR: every draw is the adapter itself; repeatable",
    )

    # --- the pool of draws --------------------------------------------------------------------
    pool_size: int = Field(8, ge=1, le=256, description="K: posterior draws loaded as LoRA slots")
    pool_seed: int = Field(0, ge=0, description="seed of the pool (same seed: same draws anywhere)")
    posterior_temperature: float = Field(
        _SAMPLER.posterior_temperature,
        ge=0,
        description="posterior temperature T: draws use variance T*sigma^2 (0: the mean)",
    )
    prune: float = Field(
        _SAMPLER.prune, ge=0, lt=1, description="fraction of LoRA entries zeroed (0: none)"
    )
    prune_by: PruneBy = Field(
        _SAMPLER.prune_by,
        description="what pruning ranks by: highest variance, lowest |m|/sigma, or random",
    )

    # --- request defaults and limits ------------------------------------------------------------
    max_candidates: int = Field(
        64, ge=1, description="most candidates one request may ask for: max(1,n_models)*n_samples"
    )
    max_continuations: int = Field(
        16,
        ge=1,
        description="most texts one scoring request may score: /score continuations, or "
        "prompts of one /v1/completions echo batch",
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
        0.7, ge=0, le=2, description="decoding temperature when a request leaves it out (0: greedy)"
    )
    default_top_p: float = Field(1.0, gt=0, le=1, description="top_p when a request leaves it out")
    default_selection: str = Field(
        "model", description="selection method when a request leaves it out (see mbr.METHODS)"
    )
    default_utility: str = Field(
        "answer", description="MBR utility when a request leaves it out (see mbr.UTILITIES)"
    )
    early_stop: Literal["off", "exact", "confidence"] = Field(
        "off",
        description="early stopping when a request leaves it out: exact (stop once nothing "
        "still running can change the answer or chosen text), confidence (Adaptive-Consistency's "
        "Beta criterion), off; a request whose utility allows only off runs with off "
        "(docs/early-stopping.md)",
    )
    early_stop_threshold: float = Field(
        0.95,
        ge=0.5,
        le=1,
        description="confidence: stop once P(the leading answer is the mode) >= this, when a "
        "request leaves it out",
    )
    early_stop_min_finished: int = Field(
        4, ge=1, description="confidence: candidates that must have finished before it stops"
    )
    request_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a generation request taking longer (queue included) is aborted and "
        "answered 504",
    )
    max_in_flight: int = Field(
        8, ge=1, description="generation requests fanned out on the engine at once"
    )
    max_queued: int = Field(
        32,
        ge=0,
        description="generation requests waiting for a slot; past in-flight + queued a request "
        "gets 429 with Retry-After",
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt in tokens (default: the context length - 1)"
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body in bytes (413 past it)"
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, how long in-flight requests may still run before they are "
        "aborted and the server exits",
    )

    # --- access -----------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="API keys clients must send as `Authorization: Bearer KEY` (comma-separated "
        "or repeated; default: no auth); /health and /ready stay open",
    )
    api_key_file: Path | None = Field(
        None, description="a file of API keys, one per line (# comments), added to --api-keys"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins allowed by CORS, e.g. https://app.example.com or * "
        "(default: CORS off)",
    )

    # --- vLLM engine (passed through) --------------------------------------------------------
    dtype: str | None = Field(
        None,
        description="model dtype (default on the CPU: bfloat16 where it has native bf16 "
        "instructions, AVX512-BF16 or AMX, else float32; vLLM's 'auto' on a GPU); float32 gives "
        "exact parity with peft+transformers",
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
    max_num_batched_tokens: int | None = Field(
        None,
        ge=16,
        description="most tokens vLLM schedules in one step; longer prefills are chunked "
        "(vLLM default)",
    )
    lora_kernel: Literal["grouped", "vllm"] = Field(
        "grouped",
        description="LoRA kernels on the CPU: ivonserve's grouped ops (one matrix product per "
        "adapter present) or vLLM's own (a per-token weight copy, plus a spare slot)",
    )
    enforce_eager: bool = Field(False, description="disable graph capture / compilation")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel size")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallel size")
    data_parallel_size: int = Field(1, ge=1, description="vLLM data parallel size")
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(
        None, description="vLLM distributed executor backend (vLLM's choice by default)"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' sources, with the renamed settings' old variables below the
        new ones."""
        renamed = _RenamedEnvironment(settings_cls)
        return init_settings, env_settings, renamed, dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values: Any) -> Any:
        """A renamed setting given to ``Settings(...)`` by its old name: its new name, and a
        deprecation warning (``build`` renames before the sources are merged)."""
        return _new_names(values) if isinstance(values, dict) else values

    @field_validator("posterior", "adapter", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """Environment variables carry lists as comma-separated text; flags repeat instead."""
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            return [p.strip() for item in items for p in str(item).split(",") if p.strip()]
        return value

    @field_validator("default_selection")
    @classmethod
    def _known_selection(cls, value: str) -> str:
        from ivonserve import mbr

        return mbr.METHODS.check(value)

    @field_validator("default_utility")
    @classmethod
    def _known_utility(cls, value: str) -> str:
        from ivonserve import mbr

        return mbr.UTILITIES.check(value)

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

    def posterior_specs(self) -> list[PosteriorSpec]:
        """Every posterior to serve, in order (the first is the default): --posterior entries,
        then --adapter entries; the repo's default posterior when neither is given."""
        given = [("posterior", item) for item in self.posterior]
        given += [("adapter", item) for item in self.adapter]
        if not given:
            given = [("posterior", str(default_posterior()))]
        specs = [PosteriorSpec.parse(item, kind) for kind, item in given]
        names = [spec.name for spec in specs]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise IvonserveError(
                f"setting posterior: the name {dupes[0]!r} is used twice; name each one, "
                "--posterior NAME=DIR"
            )
        return specs

    def engine_config(self) -> EngineConfig:
        """What the engine needs: the model, the pools and vLLM's arguments (no HTTP, no keys)."""
        from ivonserve.engine.args import EngineConfig

        passed = {f.name for f in dataclasses.fields(EngineConfig)} & set(type(self).model_fields)
        return EngineConfig(
            posteriors=tuple(self.posterior_specs()),
            sampler=SamplerConfig(self.posterior_temperature, self.prune, self.prune_by),
            **{name: getattr(self, name) for name in passed},
        )

    def api_key_list(self) -> list[str]:
        """--api-keys plus the keys in --api-key-file (blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_key_file is not None:
            try:
                text = self.api_key_file.read_text()
            except OSError as err:
                raise IvonserveError(
                    f"{self.api_key_file}: cannot read the API key file: {err.strerror}"
                ) from None
            keys += [ln.strip() for ln in text.splitlines() if ln.strip() and ln[0] != "#"]
            if len(keys) == len(self.api_keys):
                raise IvonserveError(f"{self.api_key_file}: the API key file has no keys")
        return keys

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
        """``Settings(...)`` over the config file (if any), but a bad value is a one-line
        IvonserveError naming the setting. Precedence: values > environment > file > defaults."""
        values = _new_names(values)
        path = values.get("config") or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
        if path:
            from_file = _new_names(_read_config_file(Path(path)))
            # the environment outranks the file: keep only what no variable sets
            values = {
                **{k: v for k, v in from_file.items() if not _in_environment(k)},
                **values,
            }
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
            f"  {name:<{width}} = {self._shown(name)}" for name in type(self).model_fields
        )

    def _shown(self, name: str) -> str:
        value = getattr(self, name)
        if name in SECRET_FIELDS:
            return f"<{len(value)} hidden>" if value else "<none>"
        return str(value)


def _read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML or JSON file; an unknown key is an error naming the file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise IvonserveError(f"{path}: cannot read the config file: {err.strerror}") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise IvonserveError(
            f"{path}: not valid {(path.suffix.lstrip('.') or 'toml').upper()}: {err}"
        ) from None
    if not isinstance(values, dict):
        raise IvonserveError(f"{path}: the config file must hold a table of settings")
    known = set(Settings.model_fields) | set(RENAMED)
    unknown = sorted(set(values) - known | ({"config"} & set(values)))
    if unknown:
        raise IvonserveError(f"{path}: unknown setting {unknown[0]!r} in the config file")
    return values


def _deprecated(old: str, new: str) -> None:
    logger.warning(
        "setting %s (--%s / %s%s) is deprecated: it is now %s (--%s / %s%s)",
        old, old.replace("_", "-"), ENV_PREFIX, old.upper(),
        new, new.replace("_", "-"), ENV_PREFIX, new.upper(),
    )  # fmt: skip


def _new_names(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with each renamed setting under its new name (the new name wins when both
    are given), and a deprecation warning for each old name."""
    if not RENAMED.keys() & values.keys():
        return values
    values = dict(values)
    for old, new in RENAMED.items():
        if old in values:
            _deprecated(old, new)
            value = values.pop(old)
            values.setdefault(new, value)
    return values


def _in_environment(name: str) -> bool:
    """A setting's variable is set (a renamed setting's old variable counts)."""
    names = [name, *(old for old, new in RENAMED.items() if new == name)]
    return any(f"{ENV_PREFIX}{n.upper()}" in os.environ for n in names)


class _RenamedEnvironment(PydanticBaseSettingsSource):
    """The old variable of a renamed setting (``IVONSERVE_SAMPLING_TEMPERATURE``), under its
    new name, with a deprecation warning."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {}
        for old, new in RENAMED.items():
            value = os.environ.get(f"{ENV_PREFIX}{old.upper()}")
            if value is not None:
                _deprecated(old, new)
                found[new] = value
        return found


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
        if typing.get_origin(field.annotation) is list:
            group.add_argument(flag, dest=name, action="append", metavar="VALUE", help=help_text)
            continue
        metavar, choices, optional = _type_info(field.annotation)
        if optional and choices:
            choices = [*choices, "none"]
        group.add_argument(
            flag, dest=name, default=None, metavar=metavar, choices=choices, help=help_text
        )
    for old, new in RENAMED.items():  # accepted, not shown
        group.add_argument(
            "--" + old.replace("_", "-"), dest=new, action=_RenamedFlag, help=argparse.SUPPRESS
        )
    return parser


class _RenamedFlag(argparse.Action):
    """The old flag of a renamed setting: stores the new one, with a deprecation warning."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        old = str(option).lstrip("-").replace("-", "_")
        _deprecated(old, self.dest)
        setattr(namespace, self.dest, values)
