"""Settings of the local server (flags of `pipeline serve-local`, or Python arguments)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.localserver.faults import FAULT_KINDS


@dataclass(slots=True)
class ServerOptions:
    """Every field has a default; validated on creation."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    api_key: str | None = None  # None: any non-empty key is accepted; else only this one
    rpm: int | None = None  # requests per minute, per model, fixed calendar-minute windows
    tpm: int | None = None  # input tokens per minute, per model
    rpd: int | None = None  # requests per day, per model (the day ends at midnight Pacific)
    latency_ms: float = 0.0  # mean of a seeded lognormal latency
    fault_rate: float = 0.0  # share of answers that go wrong (see faults.FAULT_KINDS)
    fault_kinds: tuple[str, ...] = FAULT_KINDS  # which faults may be injected
    seed: int = 0
    hang_seconds: float = 300.0  # how long a "hang" fault holds the request before a 504
    replay: str | None = None  # JSONL of recorded answers by image sha256
    inline_limit_bytes: int = 20 * 1024 * 1024  # request bodies above this are a 400
    file_processing_seconds: float = 0.0  # uploaded files are PROCESSING this long, then ACTIVE
    file_ttl_seconds: float = 48 * 3600  # then the file answers 403, as an expired one does
    quota_window_seconds: float = 60.0  # the RPM/TPM window; shorter only for tests
    decode_limit: int | None = None  # Interactions: output tokens per hop (requires_continuation)
    credit_budget_usd: float | None = None  # prepaid credits; spent: 402 (rule credits.depleted)
    answer_log: str | None = None  # JSONL: one line per delivered answer (time, images' sha256)
    batch_seconds: float = 10.0  # how long a Batch Mode job takes (rule batch.lifecycle)
    batch_expiry_seconds: float = 48 * 3600  # a job not done by then ends EXPIRED
    batch_max_jobs: int = 100  # unfinished jobs at once (rule batch.limit)
    batch_enqueued_tokens: int | None = None  # input tokens of a model's unfinished jobs

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be within 0-65535, got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be None (accept any key) or a non-empty string")
        for name in ("rpm", "tpm", "rpd", "decode_limit", "batch_enqueued_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {self.fault_rate}")
        for name in ("latency_ms", "hang_seconds", "file_processing_seconds", "batch_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.inline_limit_bytes <= 0 or self.file_ttl_seconds <= 0:
            raise ValueError("inline_limit_bytes and file_ttl_seconds must be positive")
        if self.batch_expiry_seconds <= 0 or self.batch_max_jobs <= 0:
            raise ValueError("batch_expiry_seconds and batch_max_jobs must be positive")
        if self.credit_budget_usd is not None and self.credit_budget_usd < 0:
            raise ValueError(
                f"credit_budget_usd must be >= 0 or None, got {self.credit_budget_usd}"
            )

    def __repr__(self) -> str:  # the key never appears in logs or reprs
        key = "None" if self.api_key is None else "'***'"
        shown = ", ".join(
            f"{name}={key if name == 'api_key' else repr(getattr(self, name))}"
            for name in self.__dataclass_fields__
        )
        return f"ServerOptions({shown})"
