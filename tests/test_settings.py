"""config/default.toml documents every setting with the code's default; resolution order holds."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from app.engine.config import EngineConfig
from app.settings import ServerConfig, default_config_path, load_settings


def _normal(value: object) -> object:
    return None if value in (0, "", None) and not isinstance(value, bool) else value


@pytest.mark.parametrize(("section", "cls"), [("engine", EngineConfig), ("server", ServerConfig)])
def test_default_toml_matches_code(section: str, cls: type) -> None:
    text = default_config_path().read_text()
    data = tomllib.loads(text)[section]
    instance = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    assert set(data) == names
    for name in names:
        code, toml = getattr(instance, name), data[name]
        if isinstance(code, list) or code not in (0, "", None) or isinstance(code, bool):
            assert code == toml, name
        else:
            assert _normal(toml) is None, name
        # Each setting has a comment line right above it (or above its group).
        assert re.search(rf"#.*\n(?:[a-z_]+ = .*\n)*{name} = ", text), name


def test_resolution_order(tmp_path) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[engine]\nmax_batch_size = 7\nblock_size = 32\n[server]\nport = 1111\n")
    env = {"SPLITFUSE_BLOCK_SIZE": "16", "SPLITFUSE_PORT": "2222", "SPLITFUSE_API_KEYS": "a,b"}
    settings = load_settings({"port": 3333}, config_file=str(config), env=env)
    assert settings.engine.max_batch_size == 7  # file over default
    assert settings.engine.block_size == 16  # environment over file
    assert settings.server.port == 3333  # flag over environment
    assert settings.server.api_keys == ["a", "b"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SPLITFUSE_MAX_BATCH_SIZE": "many"}, "max_batch_size"),
        ({"SPLITFUSE_ENABLE_PREFIX_CACHING": "maybe"}, "enable_prefix_caching"),
        ({"SPLITFUSE_BLOCK_SIZE": "48"}, "power of two"),
        ({"SPLITFUSE_DTYPE": "int3"}, "dtype"),
        ({"SPLITFUSE_QUANT_POLICY": "2"}, "quant_policy must be 0 .* or 4"),
        ({"SPLITFUSE_CPU_KV_CACHE_GIB": "0"}, r"cpu_kv_cache_gib must be a finite number > 0"),
        ({"SPLITFUSE_MAX_N": "0"}, "max_n must be >= 1, got 0"),
        ({"SPLITFUSE_MAX_SESSIONS": "0"}, "max_sessions must be >= 1"),
        ({"SPLITFUSE_MAX_LOGPROBS": "-1"}, "max_logprobs must be >= 0"),
        ({"SPLITFUSE_MAX_QUEUED_REQUESTS": "-1"}, "max_queued_requests must be >= 1, got -1"),
        ({"SPLITFUSE_MAX_QUEUED_REQUESTS": "0"}, "max_queued_requests must be >= 1"),
        ({"SPLITFUSE_MAX_BODY_BYTES": "0"}, "max_body_bytes must be >= 1"),
        ({"SPLITFUSE_MAX_TOKENS_CAP": "-5"}, "max_tokens_cap must be >= 0"),
        ({"SPLITFUSE_SHUTDOWN_TIMEOUT": "inf"}, "shutdown_timeout must be a finite number"),
        ({"SPLITFUSE_SHUTDOWN_TIMEOUT": "-1"}, "shutdown_timeout .* >= 0, got -1.0"),
        ({"SPLITFUSE_HEALTH_STALL_SECONDS": "0"}, "health_stall_seconds .* > 0, got 0.0"),
        ({"SPLITFUSE_GRAMMAR_COMPILE_TIMEOUT": "nan"}, "grammar_compile_timeout .* > 0, got nan"),
        ({"SPLITFUSE_LOG_FORMAT": "xml"}, "log_format must be one of auto, json, console"),
        ({"SPLITFUSE_LOG_LEVEL": "verbose"}, "log_level must be one of debug, info"),
        ({"SPLITFUSE_PORT": "70000"}, "setting port: 70000 is not a port number"),
    ],
)
def test_bad_values_are_one_line_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(env=env)


def test_edge_values_that_mean_something_are_kept() -> None:
    env = {
        "SPLITFUSE_SHUTDOWN_TIMEOUT": "0",  # no draining
        "SPLITFUSE_MAX_TOKENS_CAP": "0",  # up to the context window
        "SPLITFUSE_PORT": "0",  # any free port
        "SPLITFUSE_LOG_LEVEL": "WARNING",
    }
    settings = load_settings(env=env)
    assert settings.server.shutdown_timeout == 0.0 and settings.server.max_tokens_cap == 0
    assert settings.server.port == 0
    assert settings.server.log_level == "warning"


def test_unknown_key_in_config_file(tmp_path) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[engine]\nmax_batch_sise = 7\n")
    with pytest.raises(ValueError, match="max_batch_sise"):
        load_settings(config_file=str(config), env={})


def test_async_scheduling_switches_off_by_flag_or_environment() -> None:
    from app.cli import _settings, build_parser

    assert load_settings(env={}).engine.async_scheduling is True
    off = load_settings(env={"SPLITFUSE_ASYNC_SCHEDULING": "false"})
    assert off.engine.async_scheduling is False
    flag = build_parser().parse_args(["serve", "--no-async-scheduling"])
    assert _settings(flag).engine.async_scheduling is False


def test_quant_policy_by_flag_or_environment() -> None:
    from app.cli import _settings, build_parser

    assert load_settings(env={}).engine.quant_policy == 0
    assert load_settings(env={"SPLITFUSE_QUANT_POLICY": "8"}).engine.quant_policy == 8
    flag = build_parser().parse_args(["serve", "--quant-policy", "8"])
    assert _settings(flag).engine.quant_policy == 8
    flag = build_parser().parse_args(["serve", "--quant-policy", "4"])
    assert _settings(flag).engine.quant_policy == 4


def test_lmdeploy_pytorch_engine_config_maps_onto_engine_config() -> None:
    from app import PytorchEngineConfig

    # Every field of LMDeploy 0.6.5's, as a script written for it would pass them.
    config = PytorchEngineConfig(
        dtype="bfloat16", tp=1, session_len=None, max_batch_size=None, cache_max_entry_count=0.5,
        prefill_interval=16, block_size=64, num_cpu_blocks=0, num_gpu_blocks=0, adapters=None,
        max_prefill_token_num=4096, thread_safe=False, enable_prefix_caching=False,
        device_type="cuda", eager_mode=False, custom_module_map=None, download_dir=None,
        revision=None, quant_policy=4,
    )  # fmt: skip
    assert isinstance(config, EngineConfig)
    assert (config.dtype, config.max_batch_size, config.device) == ("bfloat16", 0, "cuda")
    assert (config.cache_max_entry_count, config.quant_policy) == (0.5, 4)
    assert (config.max_prefill_token_num, config.enable_prefix_caching) == (4096, False)
    refused = [
        ("adapters", {"lora": "/models/lora"}, "LoRA adapters are not supported"),
        ("revision", "main", "never downloaded"),
        ("device_type", "ascend", "device_type must be 'cuda'"),
        ("quant_policy", 2, "quant_policy must be"),
    ]
    for name, value, message in refused:
        with pytest.raises(ValueError, match=message):
            PytorchEngineConfig(**{name: value})
    with pytest.raises(TypeError, match="no_such_field"):
        PytorchEngineConfig(no_such_field=1)
