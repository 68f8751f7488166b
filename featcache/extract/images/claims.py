"""Byte-identical twins in one run are decoded once: the decoder that hashes a content first
claims it and decodes it; a decoder that finds the content claimed skips the decode and reports
the file as a twin (reason :data:`TWIN`). The batch loop gathers the twins, and the run copies
the claimer's features to them at the end (or its failure, the same bytes failing the same way).

The hash is the one the decoder computes anyway (one read per file), so claiming costs a lookup,
not a pass. Threads share a set; decoding processes share a table in shared memory (open
addressing over the first :data:`KEY_BYTES` bytes of each sha256, 32 MB per million files) under
one lock, taken once per file.
"""
from __future__ import annotations

import threading

TWIN = "\0twin"  # the "reason" a decoder gives for a twin it did not decode (not a failure)
KEY_BYTES = 16  # of the sha256 kept per claim: 2**-128 is no risk, and a miss only costs a failure line


def key_of(digest: str) -> bytes:
    return bytes.fromhex(digest[: 2 * KEY_BYTES])


class LocalClaims:
    """Claims of the threads of one process."""

    def __init__(self):
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()

    def claim(self, digest: str) -> bool:
        """True: the caller is the first with these bytes and decodes them; False: a twin."""
        key = key_of(digest)
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True


class SharedClaims:
    """Claims of decoding processes: a zero-filled table in shared memory, an all-zero key
    meaning a free slot (a content whose key is all zeros is never claimed: it is decoded)."""

    def __init__(self, shm, slots: int, lock, owner: bool):
        self.shm, self.slots, self.lock, self.owner = shm, slots, lock, owner

    @classmethod
    def create(cls, files: int) -> "SharedClaims":
        import multiprocessing
        from multiprocessing import shared_memory

        slots = 1 << max(6, (2 * files - 1).bit_length())  # at most half full: short probes
        shm = shared_memory.SharedMemory(create=True, size=slots * KEY_BYTES)
        return cls(shm, slots, multiprocessing.get_context("spawn").Lock(), owner=True)

    def handle(self) -> tuple:
        """What a decoding process needs to :meth:`attach` (passed when the process starts)."""
        return self.shm.name, self.slots, self.lock

    @classmethod
    def attach(cls, handle: tuple) -> "SharedClaims":
        from multiprocessing import shared_memory

        name, slots, lock = handle
        return cls(shared_memory.SharedMemory(name=name), slots, lock, owner=False)

    def claim(self, digest: str) -> bool:
        key = key_of(digest)
        if not any(key):
            return True
        table, mask = self.shm.buf, self.slots - 1
        slot = int.from_bytes(key[:8], "little") & mask
        with self.lock:
            while True:
                held = bytes(table[slot * KEY_BYTES : (slot + 1) * KEY_BYTES])
                if held == key:
                    return False
                if not any(held):
                    table[slot * KEY_BYTES : (slot + 1) * KEY_BYTES] = key
                    return True
                slot = (slot + 1) & mask

    def close(self) -> None:
        self.shm.close()
        if self.owner:
            self.shm.unlink()
