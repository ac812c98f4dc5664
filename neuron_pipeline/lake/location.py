"""Where the lake is: a local folder, or a prefix in object storage (S3, GCS, Azure).

``Lake.of(location, storage_options)`` is the one way the lake io, the SQL views, the viewer and
the assets name the lake. An object-store lake is a URI (``s3://bucket/prefix``,
``gs://bucket/prefix``, ``az://container/prefix`` or
``abfss://container@account.dfs.core.windows.net/prefix``) plus deltalake ``storage_options``
that are *not* secret (endpoint, region, ``allow_http``, the commit-safety choice). Credentials
are never options: deltalake's object store reads them from the environment itself
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``AZURE_STORAGE_ACCOUNT_KEY`` …, or the machine's workload identity), so they cannot end up in
settings dumps, run config, tables, logs, metadata or the viewer.

Commit safety on S3: two writers must never both commit the same Delta version. AWS S3 has
supported conditional writes (``If-None-Match: *``) since 2024, and deltalake 1.x commits with a
put-if-absent when ``aws_conditional_put`` is ``etag`` (it injects the same default itself; the
DynamoDB locking provider is gone in 1.x). We set it explicitly for every s3:// lake unless the
settings or the environment choose otherwise — e.g. ``aws_copy_if_not_exists`` for a store with
copy-if-not-exists only, or ``aws_s3_allow_unsafe_rename: "true"`` for a store with neither,
which is safe only with a single writer.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REMOTE_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
# A storage option whose name says it holds a credential (access key, secret, token, password,
# SAS, account key, private key) is refused: credentials come from the environment only.
_SECRET_KEY = re.compile(r"access_key|secret|token|password|passwd|(?:^|_)sas(?:_|$)|account_key|private_key")
_COMMIT_CHOICES = (
    "aws_conditional_put",
    "conditional_put",
    "aws_copy_if_not_exists",
    "copy_if_not_exists",
    "aws_s3_allow_unsafe_rename",
    "aws_s3_locking_provider",
)
S3_COMMIT_DEFAULT = {"aws_conditional_put": "etag"}
_CREDENTIAL_ENV = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS",
    "az": "AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LakeError(RuntimeError):
    """A lake table cannot be read or written as asked; the message says how to fix it."""


def storage_options_of(options: Mapping[str, Any] | None) -> dict[str, str]:
    """Storage options as deltalake wants them (lower-case keys, text values: YAML's ``true``
    becomes ``"true"``); a credential among them is refused with a one-line ``LakeError``."""
    out: dict[str, str] = {}
    for key, value in (options or {}).items():
        name = str(key).strip().lower()
        if _SECRET_KEY.search(name):
            env = (
                f"the environment variable {name.upper()}"
                if name.startswith(("aws_", "azure_", "google_"))
                else "the provider's environment variable (AWS_*, AZURE_*, GOOGLE_*)"
            )
            raise LakeError(
                f"{name!r} looks like a credential: remove it from lake_storage_options and set {env} instead "
                "(credentials come from the environment, never from settings)"
            )
        if isinstance(value, (dict, list, tuple, set)) or value is None:
            raise LakeError(f"lake_storage_options.{name} must be a single value, not {type(value).__name__}")
        out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


@dataclass(frozen=True)
class Lake:
    """A lake location: ``root`` is an absolute folder path or a URI without a trailing slash."""

    root: str
    storage_options: dict[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def of(cls, location: "Lake | str | os.PathLike[str]", storage_options: Mapping[str, Any] | None = None) -> "Lake":
        """The lake at a folder or URI. Storage options apply to object stores only (a local
        folder ignores them, so ``--lake ./lake`` works with settings made for S3)."""
        if isinstance(location, Lake):
            return location if storage_options is None else cls.of(location.root, storage_options)
        text = os.fspath(location).strip()
        match = _SCHEME.match(text)
        if match is None or match[1].lower() == "file":
            path = match[2] if match else text
            if not path:
                raise LakeError("the lake location is empty: set `lake` to a folder or an s3:// / gs:// / az:// URI")
            return cls(str(Path(path).expanduser().resolve()))
        scheme, rest = match[1].lower(), match[2]
        bucket = rest.split("/", 1)[0]
        if "?" in rest or "#" in rest or ":" in bucket.rpartition("@")[0]:
            # Never echo it: such a URI may carry a password or a SAS token.
            raise LakeError(
                f"the {scheme}:// lake URI carries credentials or a query string: use {scheme}://bucket/prefix "
                "and put credentials in environment variables"
            )
        if scheme not in REMOTE_SCHEMES:
            raise LakeError(
                f"lake {text!r}: {scheme}:// is not a supported store; use a local folder, s3://bucket/prefix, "
                "gs://bucket/prefix, az://container/prefix or abfss://container@account.dfs.core.windows.net/prefix"
            )
        if not bucket:
            raise LakeError(f"lake {text!r} names no bucket: use {scheme}://bucket/prefix")
        options = storage_options_of(storage_options)
        if scheme in ("s3", "s3a") and not any(k in options or k.upper() in os.environ for k in _COMMIT_CHOICES):
            options = {**S3_COMMIT_DEFAULT, **options}
        return cls(f"{scheme}://{rest.rstrip('/')}", options)

    @property
    def folder(self) -> Path | None:
        """The lake's folder when it is local; None in object storage."""
        return None if _SCHEME.match(self.root) else Path(self.root)

    def table(self, name: str) -> str:
        """Where table ``name`` is: a folder path, or a URI."""
        return str(self.folder / name) if self.folder is not None else f"{self.root}/{name}"

    def options(self) -> dict[str, str] | None:
        """``storage_options`` for deltalake and polars (None for a local lake)."""
        return dict(self.storage_options) or None

    def storage_error(self, exc: BaseException) -> LakeError:
        """One line for a storage failure (unreachable endpoint, missing bucket, refused
        credentials): what went wrong and what to check."""
        text = _ANSI.sub("", str(exc))
        code, message = re.search(r"<Code>([^<]*)</Code>", text), re.search(r"<Message>([^<]*)</Message>", text)
        if message:
            reason = f"{code[1]}: {message[1]}" if code else message[1]
        else:
            lines = [line.strip(" ↳\t") for line in text.splitlines()]
            reason = next((line for line in reversed(lines) if line), type(exc).__name__)
        if self.folder is not None:
            return LakeError(f"cannot use the lake folder {self.root} ({reason[:200]}): check the path and its permissions")
        scheme = self.root.split("://", 1)[0]
        provider = "s3" if scheme.startswith("s3") else "gs" if scheme == "gs" else "az"
        fix = (
            "create the bucket or fix the URI"
            if "NoSuchBucket" in text
            else f"check the URI, lake_storage_options (endpoint, region) and the credentials in the environment "
            f"({_CREDENTIAL_ENV[provider]})"
        )
        return LakeError(f"cannot reach the lake at {self.root} ({reason[:200]}): {fix}")

    def __str__(self) -> str:
        return self.root
