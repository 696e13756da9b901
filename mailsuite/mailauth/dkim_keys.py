"""DKIM keys on disk: ``<data_dir>/dkim/<domain>/<selector>.key`` and ``.json``.

One folder per domain holds each selector's private key (mode 0600: PEM PKCS#1 for RSA, the
base64 seed dkimpy reads for ed25519), its description (algorithm, size, public key, when made)
and ``_signing.json``: which selector signs for each algorithm.  Files are written atomically
and durably under a lock by the ``mailsuite dkim`` command, and handed to the data folder's
owner like the rest of it.  The running server reads them through :meth:`KeyStore.signing_keys`,
which looks at two stat results per call and reloads the domain when either changed, so a new
key or ``dkim use`` is picked up on the next message without a restart (as users are).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailsuite.mailauth.dns import normalize_name
from mailsuite.ownership import like_data_dir
from mailsuite.store.maildir import fsync_dir

__all__ = ["ALGORITHMS", "DKIMKey", "KeyStore", "KeyStoreError", "txt_strings", "zone_txt"]

#: key type -> the a= value it signs with (RFC 6376 3.3, RFC 8463 3)
ALGORITHMS = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
RSA_BITS = 2048
SIGNING_FILE = "_signing.json"  # '_' cannot start a selector, so no selector can clash
# RFC 6376 3.1: a selector is one or more DNS labels; kept to lower-case LDH labels here
_SELECTOR = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}"
    r"[a-z0-9])?)*$"
)


class KeyStoreError(Exception):
    """A refused key operation, worded for the person at the command line."""


def txt_strings(text: str, size: int = 255) -> list[str]:
    """Split a TXT value into character-strings of at most ``size`` octets (RFC 1035 3.3.14)."""
    data = text.encode("ascii")
    return [data[i : i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def zone_txt(owner: str, text: str) -> str:
    """``owner IN TXT "..." "..."``: a zone-file line with the value split into strings."""
    strings = " ".join(
        '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in txt_strings(text)
    )
    return f"{owner} IN TXT {strings}"


@dataclass(frozen=True)
class DKIMKey:
    """One selector's key: ``private`` is what dkimpy's signer takes for its algorithm."""

    domain: str
    selector: str
    kind: str  # "rsa" | "ed25519"
    bits: int
    public: str  # base64, the p= value
    created: str
    private: bytes = b""

    @property
    def algorithm(self) -> str:
        return ALGORITHMS[self.kind]

    @property
    def owner(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."

    def record(self) -> str:
        """The TXT record to publish (RFC 6376 3.6.1; k=ed25519 per RFC 8463 4)."""
        return f"v=DKIM1; k={self.kind}; p={self.public}"

    def zone_line(self) -> str:
        return zone_txt(self.owner, self.record())


def _new_key(kind: str) -> tuple[bytes, str, int]:
    """(private key as stored, public key base64, bits)."""
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return private, base64.b64encode(der).decode("ascii"), RSA_BITS
    if kind == "ed25519":
        signing = nacl.signing.SigningKey.generate()
        private = signing.encode(encoder=nacl.encoding.Base64Encoder) + b"\n"
        public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode("ascii")
        return private, public, 256
    raise KeyStoreError(f"unknown algorithm {kind!r}: use rsa or ed25519")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise


def _json(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


class _Loaded:
    __slots__ = ("keys", "stamp")

    def __init__(self, stamp: tuple[object, ...] | None, keys: list[DKIMKey]) -> None:
        self.stamp = stamp
        self.keys = keys


class KeyStore:
    """The ``dkim`` folder: written by the CLI, read (thread-safely) by the signer."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._loaded: dict[str, _Loaded] = {}

    # -- names ---------------------------------------------------------------------------

    @staticmethod
    def domain_name(domain: str) -> str:
        clean = normalize_name(domain)
        if clean is None or "." not in clean or "/" in clean:
            raise KeyStoreError(f"{domain!r} is not a valid domain name")
        return clean

    @staticmethod
    def selector_name(selector: str) -> str:
        clean = selector.strip().lower()
        if not _SELECTOR.match(clean) or len(clean) > 200:
            raise KeyStoreError(
                f"{selector!r} is not a valid selector (letters, digits and "
                "'-', labels separated by dots, e.g. 's2026')"
            )
        return clean

    def _dir(self, domain: str) -> Path:
        return self.root / domain

    # -- reading -------------------------------------------------------------------------

    def domains(self) -> list[str]:
        try:
            return sorted(
                p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
        except FileNotFoundError:
            return []

    def signing(self, domain: str) -> dict[str, str]:
        """kind -> selector that signs, for ``domain``."""
        try:
            raw = json.loads((self._dir(domain) / SIGNING_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return {k: v for k, v in raw.items() if k in ALGORITHMS and isinstance(v, str)}

    def keys(self, domain: str, with_private: bool = False) -> list[DKIMKey]:
        """Every selector of ``domain``, sorted by selector."""
        folder = self._dir(domain)
        out = []
        try:
            names = sorted(folder.glob("*.json"))
        except FileNotFoundError:
            return []
        for meta_path in names:
            if meta_path.name == SIGNING_FILE:
                continue
            key = self._read(domain, meta_path.stem, with_private)
            if key is not None:
                out.append(key)
        return out

    def _read(self, domain: str, selector: str, with_private: bool) -> DKIMKey | None:
        folder = self._dir(domain)
        try:
            meta = json.loads((folder / f"{selector}.json").read_text(encoding="utf-8"))
            private = (folder / f"{selector}.key").read_bytes() if with_private else b""
            return DKIMKey(
                domain,
                selector,
                meta["kind"],
                int(meta["bits"]),
                meta["public"],
                meta.get("created", ""),
                private,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _stamp(self, domain: str) -> tuple[object, ...] | None:
        folder = self._dir(domain)
        try:
            st = folder.stat()
        except FileNotFoundError:
            return None
        try:
            sf = (folder / SIGNING_FILE).stat()
            signing: tuple[int, int, int] | None = (sf.st_ino, sf.st_mtime_ns, sf.st_size)
        except FileNotFoundError:
            signing = None
        return (st.st_ino, st.st_mtime_ns, signing)

    def signing_keys(self, domain: str) -> list[DKIMKey]:
        """The keys (with private parts) that sign for ``domain`` now: at most one per kind.

        Cheap when nothing changed (two stats); safe to call from several threads.
        """
        stamp = self._stamp(domain)
        with self._lock:
            loaded = self._loaded.get(domain)
            if loaded is not None and loaded.stamp == stamp:
                return loaded.keys
        keys: list[DKIMKey] = []
        if stamp is not None:
            for kind, selector in sorted(self.signing(domain).items()):
                key = self._read(domain, selector, with_private=True)
                if key is not None and key.kind == kind and key.private:
                    keys.append(key)
        with self._lock:
            self._loaded[domain] = _Loaded(stamp, keys)
            while len(self._loaded) > 1024:
                self._loaded.pop(next(iter(self._loaded)))
        return keys

    # -- writing (CLI) -------------------------------------------------------------------

    @contextmanager
    def _editing(self, domain: str) -> Iterator[Path]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            folder = self._dir(domain)
            folder.mkdir(mode=0o700, exist_ok=True)
            yield folder
            fsync_dir(folder)
            fsync_dir(self.root)
        data_dir = self.root.parent
        like_data_dir(data_dir, [self.root, lock_path])
        like_data_dir(data_dir, [folder], tree=True)

    def generate(self, domain: str, selector: str, kind: str) -> tuple[DKIMKey, bool]:
        """Make a new key; it signs at once when ``domain`` has none of this kind signing.
        Returns the key and whether it signs now."""
        domain, selector = self.domain_name(domain), self.selector_name(selector)
        if kind not in ALGORITHMS:
            raise KeyStoreError(f"unknown algorithm {kind!r}: use rsa or ed25519")
        private, public, bits = _new_key(kind)
        with self._editing(domain) as folder:
            if (folder / f"{selector}.json").exists() or (folder / f"{selector}.key").exists():
                raise KeyStoreError(
                    f"{domain} already has a selector {selector!r}; choose a new "
                    "one (rotation: new selector, publish, 'mailsuite dkim use')"
                )
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            _write_atomic(folder / f"{selector}.key", private, 0o600)
            meta = {"kind": kind, "bits": bits, "public": public, "created": created}
            _write_atomic(folder / f"{selector}.json", _json(meta), 0o600)
            signing = self.signing(domain)
            activate = kind not in signing
            if activate:
                signing[kind] = selector
                _write_atomic(folder / SIGNING_FILE, _json(signing), 0o600)
        return DKIMKey(domain, selector, kind, bits, public, created), activate

    def use(self, domain: str, selector: str) -> DKIMKey:
        """Make ``selector`` the one that signs for its algorithm."""
        domain, selector = self.domain_name(domain), self.selector_name(selector)
        key = self._read(domain, selector, with_private=True)
        if key is None or not key.private:
            known = ", ".join(k.selector for k in self.keys(domain)) or "none"
            raise KeyStoreError(
                f"{domain} has no key with selector {selector!r} (selectors: "
                f"{known}; make one with 'mailsuite dkim keygen')"
            )
        with self._editing(domain) as folder:
            signing = self.signing(domain)
            signing[key.kind] = selector
            _write_atomic(folder / SIGNING_FILE, _json(signing), 0o600)
        return key
