"""Release folders in MLflow: the manifest's headline metrics on a run, and the model registry.

:class:`ReleaseRegistry` is a mixin of :class:`tasks.tracking_mlflow.MlflowTracker` (it uses the host's
``client``, ``remote``, ``uri``, ``log_metrics``, ``log_artifact`` and ``log_dict``). A registered
version points at the release folder itself on a local store: the weights are never copied into MLflow.
The manifest readers it uses are pure functions in :mod:`tasks.tracking_values`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from crepe.errors import CrepeError
from crepe.io import read_json, sha256_file
from tasks.tracking import run_id_of
from tasks.tracking_values import (
    TAG_PREFIX,
    manifest_metrics,
    one_line,
    release_manifest,
    release_tags,
    tag_items,
)


class ReleaseRegistry:
    """Manifest metrics and model-registry versions of release folders (see the module docstring)."""

    def log_manifest(self, run: Any, manifest_path: str | Path, artifact_path: str = "manifest") -> dict[str, float]:
        """Log a release/prune manifest JSON as an artifact and its headline numbers as metrics.

        Understands ``crepe_release.json`` (``sparsity.overall``, ``smoke_test.ppl``, ``metrics``) and the
        ``crepe prune`` manifest (``prune.overall_sparsity``, ``evaluation.ppl``); returns the metrics logged.
        """
        path = Path(manifest_path)
        manifest = read_json(path, "manifest")
        self.log_artifact(run, path, artifact_path)
        return self.log_metrics(run, manifest_metrics(manifest))

    def register_release(self, release_dir: str | Path, name: str, alias: str | None = "candidate", run: Any = None,
                         *, dvc_path: str | None = None, tags: Mapping[str, Any] | None = None,
                         description: str | None = None) -> dict[str, Any]:
        """Register a release folder as a version of registered model ``name`` and point ``alias`` at it.

        **No second copy of the weights.** On a local store the version's *source* is the release folder
        itself (``file:///.../data/release``). A remote tracking server refuses client-local paths (it
        cannot see them); there the source is ``runs:/<run>/release``, a small pointer logged into ``run``:
        the manifest, the model card and ``pointer.json`` (release path, DVC path, manifest sha256), never
        the weights. The version carries ``crepe.*`` tags read from the manifest (:func:`release_tags`),
        ``crepe.release_path``, ``crepe.dvc_path``, ``crepe.manifest_sha256``, plus ``tags``.

        Idempotent: a version of ``name`` with the same manifest sha256 is reused (the alias is still
        (re)set), so a resumed pipeline does not register twice. ``alias`` is moved to this version.
        Returns ``{"name", "version", "alias", "source", "run_id", "created"}``.
        """
        manifest_path = release_manifest(release_dir, alias)
        folder = manifest_path.parent
        rid = None if run is None else run_id_of(run)
        digest = sha256_file(manifest_path)
        version_tags = {**release_tags(read_json(manifest_path, "manifest")),
                        f"{TAG_PREFIX}manifest_sha256": digest, f"{TAG_PREFIX}release_path": str(folder)}
        if dvc_path:
            version_tags[f"{TAG_PREFIX}dvc_path"] = dvc_path
        version_tags.update(tag_items(tags or {}))
        if rid is not None:
            self._log_release_pointer(rid, folder, manifest_path, digest, dvc_path)
        if self.remote and rid is None:
            raise CrepeError(
                f"registering {folder} on the remote tracking server {self.uri} needs the pipeline run (the server "
                "cannot read local paths, so a pointer is logged into that run)"
            )
        source = f"runs:/{rid}/release" if self.remote else folder.as_uri()
        client = self.client
        try:
            try:
                client.create_registered_model(name, tags={f"{TAG_PREFIX}kind": "release"})
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS" and "already exists" not in str(exc):
                    raise
            found = client.search_model_versions(f"name = '{name}' and tags.`{TAG_PREFIX}manifest_sha256` = '{digest}'")
            if found:
                version = max(found, key=lambda v: int(v.version))
            else:
                version = client.create_model_version(name, source, run_id=rid, tags=version_tags,
                                                      description=description)
            if alias is not None:
                client.set_registered_model_alias(name, alias, version.version)
        except MlflowException as exc:
            raise CrepeError(f"cannot register {folder} as MLflow model {name!r}: {one_line(exc)}") from None
        return {"name": name, "version": str(version.version), "alias": alias, "source": version.source,
                "run_id": rid, "created": not found}

    def _log_release_pointer(self, rid: str, folder: Path, manifest: Path, digest: str, dvc_path: str | None) -> None:
        self.log_artifact(rid, manifest, "release")
        if (folder / "README.md").is_file():
            self.log_artifact(rid, folder / "README.md", "release")
        self.log_dict(rid, {"release_path": str(folder), "dvc_path": dvc_path, "manifest": manifest.name,
                            "manifest_sha256": digest,
                            "note": "the weights are not copied here; they live in release_path (versioned by DVC)"},
                      "release/pointer.json")

    def model_version(self, name: str, alias: str) -> dict[str, Any] | None:
        """``{"version", "source", "run_id", "tags"}`` of the version ``alias`` points at, None if none."""
        try:
            v = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return {"version": str(v.version), "source": v.source, "run_id": v.run_id, "tags": dict(v.tags)}
