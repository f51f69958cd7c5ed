"""Spreading PHO candidates over the visible GPUs: one candidate per GPU, never two on one device.

Two mechanisms, each enough on its own on one machine, together also on shared clusters:

- **Placement.** With ``runner.backend: dask`` (local cluster), ``model.device`` ``cuda`` or ``auto`` and
  GPUs visible, the Dask cluster gets one single-threaded worker per visible GPU, each with
  ``CUDA_VISIBLE_DEVICES`` pinned to its GPU and the worker resource ``GPU=1``
  (:func:`dask_cluster_spec`). A candidate then sees exactly one GPU, as ``cuda:0``.
  With the thread backend (or a remote Dask cluster whose workers see several GPUs) the
  ``index``-th candidate takes ``cuda:<index mod n>`` (:func:`candidate_device`), so the
  candidates that run at the same time land on different GPUs.
- **A Prefect concurrency slot per GPU.** The verify-candidate task holds the global concurrency limit
  ``crepe-gpu-<host>-<id>`` (:func:`gpu_limit_name`, ``<id>`` the physical GPU index or UUID as
  ``CUDA_VISIBLE_DEVICES`` names it) while it runs (:func:`gpu_slot`). The limit is created with 1
  slot when it does not exist yet (create it yourself with a larger limit to let candidates share a
  GPU), so a second candidate aimed at a busy GPU waits for it. Across processes the slots are
  coordinated by the Prefect API: a real server (``PREFECT_API_URL``) for remote workers.

On a machine without GPUs, and for ``model.device: cpu`` or an explicit ``cuda:N``, none of this
applies: the cluster, the device string and the task are as before (an explicit ``cuda:N`` still takes
its slot, so candidates on that GPU take turns). The functions that decide are pure and take the
visible devices as arguments, so they are tested without a GPU.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

LIMIT_PREFIX = "crepe-gpu-"
GPU_RESOURCE = "GPU"
SPREAD_DEVICES = ("cuda", "auto")  # device settings that let crepe choose the GPU


def visible_gpus(env: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """Physical ids of the GPUs this process sees, in torch's order (``cuda:i`` is the i-th).

    ``CUDA_VISIBLE_DEVICES`` (``env``, default ``os.environ``) names them when set (indices or UUIDs);
    otherwise they are ``0 .. count - 1``. ``count`` defaults to ``torch.cuda.device_count()`` (0
    without CUDA). An empty ``CUDA_VISIBLE_DEVICES`` hides every GPU.
    """
    env = os.environ if env is None else env
    if count is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    named = env.get("CUDA_VISIBLE_DEVICES")
    if named is None:
        return [str(i) for i in range(count)]
    ids = [part.strip() for part in named.split(",")]
    ids = ids[: next((i for i, part in enumerate(ids) if not part), len(ids))]  # CUDA stops at an empty entry
    return ids[:count]


def spreads(device: str, n_gpus: int) -> bool:
    """True when crepe places the candidates itself: ``cuda`` or ``auto`` with at least one GPU."""
    return device in SPREAD_DEVICES and n_gpus > 0


def candidate_device(device: str, index: int, n_gpus: int) -> str:
    """The device the ``index``-th candidate runs on, from ``model.device`` and the GPUs visible to it.

    ``cuda``/``auto`` with ``n`` GPUs: ``cuda:<index mod n>`` (consecutive candidates, the ones that run
    together, get different GPUs; in a pinned Dask worker ``n`` is 1, so ``cuda:0``). Anything else
    (``cpu``, an explicit ``cuda:N``, no GPU) is returned unchanged.
    """
    if not spreads(device, n_gpus):
        return device
    return f"cuda:{index % n_gpus}"


def gpu_of(device: str, visible: Sequence[str]) -> str | None:
    """The physical id of the GPU that the device string ``device`` names in this process, else None.

    ``cuda`` is ``cuda:0`` here (crepe never changes torch's current device); ``auto`` is the first
    visible GPU, or the CPU without one. A ``cuda:N`` beyond the visible GPUs is None (the model loader
    refuses it in one sentence).
    """
    if device == "auto":
        return visible[0] if visible else None
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        return None
    index = int(match.group(1) or 0)
    return visible[index] if index < len(visible) else None


def gpu_limit_name(gpu: str, host: str | None = None) -> str:
    """``crepe-gpu-<host>-<id>``: the Prefect concurrency limit of one physical GPU of one machine."""
    host = socket.gethostname() if host is None else host
    return LIMIT_PREFIX + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{host}-{gpu}")


def dask_cluster_spec(max_workers: int, gpus: Sequence[str]) -> dict[str, Any]:
    """``DaskTaskRunner`` keyword arguments for a local cluster.

    Without ``gpus``: ``max_workers`` worker processes with one thread each (a ``LocalCluster``, as
    before). With ``gpus`` (physical ids): a ``SpecCluster`` with one single-threaded worker per GPU
    (``max_workers`` is ignored: the GPUs are the workers), named ``gpu-<id>``, each with
    ``CUDA_VISIBLE_DEVICES=<id>``, the resource ``GPU=1`` and no Dask memory limit (a worker holds a
    model, possibly a whole offloaded one in host memory, which Dask cannot spill).
    """
    if not gpus:
        return {"cluster_kwargs": {"n_workers": max_workers, "threads_per_worker": 1, "processes": True,
                                   "dashboard_address": None}}
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"duplicate GPU ids in {list(gpus)}")
    from distributed import Nanny, Scheduler, SpecCluster  # optional: only a local Dask GPU cluster needs it

    workers = {
        f"gpu-{gpu}": {"cls": Nanny, "options": {
            "nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": gpu}, "resources": {GPU_RESOURCE: 1},
            "memory_limit": 0, "host": "127.0.0.1", "silence_logs": logging.WARNING}}
        for gpu in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    return {"cluster_class": SpecCluster,
            "cluster_kwargs": {"workers": workers, "scheduler": scheduler, "silence_logs": logging.WARNING}}


def ensure_gpu_limit(name: str) -> None:
    """Create the global concurrency limit ``name`` with one slot unless it exists (an existing limit,
    whatever its size, is left as it is)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another candidate created it first


@contextmanager
def gpu_slot(device: str, visible: Sequence[str] | None = None, host: str | None = None) -> Iterator[str | None]:
    """Hold the Prefect concurrency slot of the GPU ``device`` names (waiting while another candidate
    holds it) and yield the GPU's physical id; for a CPU device, hold nothing and yield None."""
    gpu = gpu_of(device, visible_gpus() if visible is None else visible)
    if gpu is None:
        yield None
        return
    name = gpu_limit_name(gpu, host)
    ensure_gpu_limit(name)
    # strict: a missing limit is an error, never a silent "no limit"; a failed lease renewal during a
    # long candidate does not kill it (the slot is released when the task ends either way)
    with concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        yield gpu
