"""Interactive sessions: a session's token history and the KV blocks it holds between turns.

Plain Python, owned by the scheduler. An idle session keeps references to its blocks (the last,
partial block included) so its next turn prefills only the new tokens; under memory pressure the
scheduler releases them into the prefix cache, whose session tier is evicted last.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from app.engine.block_manager import BlockManager


class SessionBusyError(RuntimeError):
    """A turn was sent to a session whose previous turn is still generating."""


@dataclass
class Session:
    session_id: int
    history: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # history tokens whose KV the held blocks contain
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    busy_request: str | None = None


class SessionManager:
    """Sessions by id, least recently used first."""

    def __init__(self, block_manager: BlockManager, ttl: float, max_sessions: int):
        self.block_manager = block_manager
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[int, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: int) -> Session | None:
        return self._sessions.get(session_id)

    def begin_turn(self, session_id: int, request_id: str) -> Session:
        """Mark the session busy with `request_id`, creating it if new."""
        session = self._sessions.get(session_id)
        if session is None:
            while len(self._sessions) >= self.max_sessions and self._evict_one_idle():
                pass
            session = self._sessions[session_id] = Session(session_id)
        elif session.busy_request is not None:
            raise SessionBusyError(f"session {session_id} is busy with another request")
        session.busy_request = request_id
        session.last_used = time.monotonic()
        self._sessions.move_to_end(session_id)
        return session

    def end_turn(
        self,
        session: Session,
        history: list[int],
        num_computed_tokens: int,
        block_table: list[int],
        block_hashes: list[int],
    ) -> None:
        if session.block_table and session.block_table is not block_table:
            self.release_blocks(session)  # the turn ended before it took them: don't leak them
        session.history = history
        session.num_computed_tokens = num_computed_tokens
        session.block_table, session.block_hashes = block_table, block_hashes
        session.busy_request = None
        session.last_used = time.monotonic()
        if session.session_id not in self._sessions:  # ended while the turn ran
            self.release_blocks(session)

    def take_blocks(self, session: Session) -> tuple[list[int], list[int], int]:
        blocks, hashes, computed = (
            session.block_table,
            session.block_hashes,
            session.num_computed_tokens,
        )
        session.block_table, session.block_hashes = [], []
        return blocks, hashes, computed

    def release_blocks(self, session: Session) -> None:
        if session.block_table:
            self.block_manager.release(session.block_table, session=True)
            session.block_table, session.block_hashes = [], []

    def release_idle_lru(self) -> bool:
        """Release the blocks of the least recently used idle session holding any; True if done."""
        for session in self._sessions.values():
            if session.busy_request is None and session.block_table:
                self.release_blocks(session)
                return True
        return False

    def end(self, session_id: int) -> Session | None:
        """Forget the session; its blocks go back to the pool at once (if idle)."""
        session = self._sessions.pop(session_id, None)
        if session is not None and session.busy_request is None:
            self.release_blocks(session)
        return session

    def expired(self, now: float | None = None) -> list[int]:
        now = time.monotonic() if now is None else now
        return [
            s.session_id
            for s in self._sessions.values()
            if s.busy_request is None and now - s.last_used > self.ttl
        ]

    def _evict_one_idle(self) -> bool:
        for session_id, session in self._sessions.items():
            if session.busy_request is None:
                self.end(session_id)
                return True
        return False
