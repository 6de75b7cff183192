"""Members from the InferencePool and its ready pods, through the EPP's watcher.

The EPP's :class:`~epp.discovery.kubernetes.InferencePoolDiscovery` already lists and
watches the pool and the pods it selects (resuming, relisting on 410 Gone); the sidecar
feeds it a private :class:`~epp.datastore.Datastore` and reads that datastore's
snapshot: every ready pod contributes its IP, the pool's target ports and its role.
A pod that leaves the pool (deleted, relabelled out of the selector, no longer ready)
drops out of the snapshot, and a relabelled role applies at the next request.
"""

from __future__ import annotations

from epp.datastore import Datastore, Endpoint
from epp.discovery.kubernetes import POOL_GROUP, InferencePoolDiscovery
from sidecar.ssrf.rules import Member, Members

__all__ = ["PoolSource"]


def _members(endpoints: tuple[Endpoint, ...]) -> Members:
    return Members(
        Member(
            ep.address,
            frozenset({ep.port}),
            frozenset({ep.role}) if ep.role else frozenset(),
        )
        for ep in endpoints
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
        self._datastore = Datastore()
        self._discovery = InferencePoolDiscovery(
            pool_name=name,
            namespace=namespace,
            pool_group=pool_group,
            api_server=api_server,
            kubeconfig=kubeconfig,
            watch_timeout_s=watch_timeout_s,
            sync_timeout_s=sync_timeout_s,
        )
        self._snapshot: tuple[Endpoint, ...] | None = None
        self._members = Members()

    async def start(self) -> None:
        # Waits (briefly) for the first listing; until then members() is None.
        await self._discovery.start(self._datastore)

    async def stop(self) -> None:
        await self._discovery.stop()

    def members(self) -> Members | None:
        if not self._discovery.synced.is_set():
            return None
        snapshot = self._datastore.snapshot()
        # The datastore builds a new tuple on every change (labels included).
        if snapshot is not self._snapshot:
            self._snapshot = snapshot
            self._members = _members(snapshot)
        return self._members
