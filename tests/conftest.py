"""Shared test set-up: hermetic, offline, single-threaded, with cached tiny models.

The environment variables are set at import time, before any test module imports transformers or
huggingface_hub (both read them once, at import), so no test can reach the hub or a user's cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="ram-trl-test-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(
    {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": _HF_HOME,
        "RAM_TRL_CACHE": os.path.join(_HF_HOME, "ram-trl"),  # compiled kernels: built once here
    }
)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(1)

settings.register_profile("ci", deadline=None, max_examples=50)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TinyBaseFactory = Callable[..., Path]
TinyAgentsFactory = Callable[..., dict[str, Path]]


def require_native():
    """ram-trl's compiled kernels; the test is skipped on a machine without a C compiler, and
    fails where one is found but the build does not work."""
    from ram_trl import native

    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler: the compiled kernels cannot be built here")
    lib = native.library()
    assert lib is not None, "a C compiler is here, but ram-trl's kernels did not build"
    return lib


@pytest.fixture(params=["compiled", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test twice: with the compiled kernels, and on the torch path alone
    (``RAM_TRL_NATIVE=0``), which must give the same bits."""
    if request.param == "torch":
        monkeypatch.setenv("RAM_TRL_NATIVE", "0")
    else:
        require_native()
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests on machines without CUDA instead of failing them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyBaseFactory:
    """``factory(arch="qwen2", tie=False, dtype=torch.float32, sharded=False) -> Path``.

    Each combination is written once per session (sharded = ``max_shard_size="20KB"``, about a
    dozen shards plus an index). Tests must treat the returned folders as read-only.
    """
    from ram_trl.testing import save_tiny_base

    cache: dict[tuple[str, bool, torch.dtype, bool], Path] = {}

    def factory(
        arch: str = "qwen2",
        tie: bool = False,
        dtype: torch.dtype = torch.float32,
        sharded: bool = False,
    ) -> Path:
        key = (arch, tie, dtype, sharded)
        if key not in cache:
            name = f"base-{arch}-{'tied' if tie else 'untied'}-{str(dtype)[6:]}"
            folder = tmp_path_factory.mktemp(name + ("-sharded" if sharded else ""))
            cache[key] = save_tiny_base(
                folder,
                arch,  # type: ignore[arg-type]
                tie_word_embeddings=tie,
                dtype=dtype,
                max_shard_size="20KB" if sharded else None,
            )
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_agents_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyAgentsFactory:
    """``factory(base_path, names=("a", "b", "c"), density=0.05, overlap=0.5, seed=0)``.

    Returns ``{name: path}`` from :func:`ram_trl.testing.make_sparse_agents`, cached per
    argument combination; ``density`` may be a float, a sequence or a mapping. Read-only folders.
    """
    from ram_trl.testing import make_sparse_agents

    cache: dict[tuple, dict[str, Path]] = {}

    def factory(
        base_path: Path,
        names: Sequence[str] = ("a", "b", "c"),
        density: float | Sequence[float] | Mapping[str, float] = 0.05,
        overlap: float = 0.5,
        seed: int = 0,
    ) -> dict[str, Path]:
        if isinstance(density, Mapping):
            density_key: object = tuple(sorted(density.items()))
        elif isinstance(density, (int, float)):
            density_key = float(density)
        else:
            density_key = tuple(density)
        key = (str(base_path), tuple(names), density_key, overlap, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("agents")
            cache[key] = make_sparse_agents(
                base_path, out, list(names), density=density, overlap=overlap, seed=seed
            )
        return dict(cache[key])

    return factory
