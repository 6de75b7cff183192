"""Members from the InferencePool and its ready pods, through the shared pool watcher.

:class:`~common.inference_pool.InferencePoolWatcher` lists and watches the pool and the
pods it selects (resuming, relisting on 410 Gone) and hands over every ready pod's
target ports after each change: every ready pod contributes its IP, the pool's target
ports and its role. A pod that leaves the pool (deleted, relabelled out of the
selector, no longer ready) drops out, and a relabelled role applies at the next request.
"""

from __future__ import annotations

from common.inference_pool import POOL_GROUP, InferencePoolWatcher, PodPort
from sidecar.ssrf.rules import Member, Members

__all__ = ["PoolSource"]


def _members(pods: list[PodPort]) -> Members:
    return Members(
        Member(
            pp.address,
            frozenset({pp.port}),
            frozenset({pp.role}) if pp.role else frozenset(),
        )
        for pp in pods
    )


class PoolSource:
    """The pool as a :class:`~sidecar.ssrf.guard.MemberSource`."""

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        pool_group: str = POOL_GROUP,
        api_server: str | None = None,
        kubeconfig: str | None = None,
        watch_timeout_s: int = 60,
        sync_timeout_s: float = 5.0,
    ) -> None:
        self.description = f"InferencePool {namespace}/{name}"
        self._watcher = InferencePoolWatcher(
            pool_name=name,
            on_change=self._on_change,
            namespace=namespace,
            pool_group=pool_group,
            api_server=api_server,
            kubeconfig=kubeconfig,
            watch_timeout_s=watch_timeout_s,
            sync_timeout_s=sync_timeout_s,
        )
        self._members = Members()

    async def start(self) -> None:
        # Waits (briefly) for the first listing; until then members() is None.
        await self._watcher.start()

    async def stop(self) -> None:
        await self._watcher.stop()

    def _on_change(self, pods: list[PodPort]) -> None:
        self._members = _members(pods)

    def members(self) -> Members | None:
        if not self._watcher.synced.is_set():
            return None
        return self._members
