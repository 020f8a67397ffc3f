"""The CPU cache budgets: read from the machine's L2 size, scaled from the measured 2 MiB point, overridable."""

import pytest

from siglip2_jax import defaults


def fake_cache(tmp_path, entries):
    for i, (level, kind, size) in enumerate(entries):
        d = tmp_path / f"index{i}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    return tmp_path


def test_l2_size_is_read_from_sysfs(tmp_path):
    root = fake_cache(tmp_path, [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "1280K"), (3, "Unified", "300M")])
    assert defaults.l2_cache_bytes(root) == 1280 << 10
    assert defaults.l2_cache_bytes(fake_cache(tmp_path / "m", [(2, "Unified", "2M")])) == 2 << 20
    assert defaults.l2_cache_bytes(tmp_path / "absent") is None
    assert defaults.l2_cache_bytes(fake_cache(tmp_path / "bad", [(2, "Unified", "lots")])) is None


@pytest.mark.parametrize("l2, expected", [(2 << 20, 2048), (1 << 20, 1024), (1280 << 10, 1024), (4 << 20, 4096),
                                          (32 << 20, 8192), (64 << 10, 512), (None, 2048)])
def test_budgets_scale_with_l2_within_4x(monkeypatch, l2, expected):
    monkeypatch.setattr(defaults, "l2_cache_bytes", lambda: l2)
    assert defaults.scaled_to_l2(2048) == expected
    assert defaults.scaled_to_l2(8 << 20) == expected << 12


def test_tokens_per_call_env_override(monkeypatch):
    monkeypatch.setattr(defaults, "l2_cache_bytes", lambda: 2 << 20)
    monkeypatch.setenv(defaults.TOKENS_PER_CALL_ENV, "512")
    assert defaults._cpu_tokens_per_call() == 512
    monkeypatch.setenv(defaults.TOKENS_PER_CALL_ENV, "many")
    with pytest.warns(UserWarning, match="SIGLIP2_CPU_TOKENS_PER_CALL='many' ignored"):
        assert defaults._cpu_tokens_per_call() == 2048
    monkeypatch.delenv(defaults.TOKENS_PER_CALL_ENV)
    assert defaults._cpu_tokens_per_call() == 2048
