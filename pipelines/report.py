"""The run report: object accounting, dead letters, throughput; written as JSON and summarised on the console."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from operators.media.listing import shown_path

from .config_secrets import redact_obj

OBJECT_STATUSES = ("ingested", "unchanged", "failed", "skipped")


def _write_whole(path: Path, text: str) -> None:
    """Write a file whole or not at all: a full disk must not leave a truncated report that tools then misread."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class RunReport:
    """What one ingestion run did, object by object and in totals."""

    run_id: str
    collection: str
    source: str
    model: str
    model_commit: str | None = None  # the hub commit every worker loaded (None: a local folder)
    objects: dict[str, str] = field(default_factory=dict)  # uri -> ingested | unchanged | failed | skipped
    points_written: int = 0
    points_per_modality: dict[str, int] = field(default_factory=dict)
    units_failed: int = 0
    deleted_stale_objects: int = 0
    # Changed objects that now fail: their old points were deleted, and nothing replaced them.
    removed_failed_objects: int = 0
    pruned_objects: int = 0
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    write_stats: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the run stopped on an infrastructure error (see pipelines.ingest)

    def counts(self) -> dict[str, int]:
        """Objects per status."""
        out = dict.fromkeys(OBJECT_STATUSES, 0)
        for status in self.objects.values():
            out[status] += 1
        return out

    @property
    def nothing_ingested(self) -> bool:
        """True when objects failed and none was ingested or already up to date."""
        c = self.counts()
        return c["failed"] > 0 and c["ingested"] == 0 and c["unchanged"] == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready report."""
        data = asdict(self)
        data["counts"] = self.counts()
        data["throughput_points_per_s"] = self.points_written / self.wall_seconds if self.wall_seconds else 0.0
        data.pop("dead_letters")
        data["dead_letter_count"] = len(self.dead_letters)
        return data

    def write(self, run_dir: Path, report_file: str, dead_letter_file: str, secrets: Iterable[str]) -> Path:
        """Write report.json and the dead-letter JSONL (secrets scrubbed) into run_dir."""
        secrets = list(secrets)
        run_dir.mkdir(parents=True, exist_ok=True)
        letters = "".join(json.dumps(redact_obj(record, secrets), ensure_ascii=False) + "\n"
                          for record in self.dead_letters)
        _write_whole(run_dir / dead_letter_file, letters)
        path = run_dir / report_file
        _write_whole(path, json.dumps(redact_obj(self.as_dict(), secrets), indent=2, ensure_ascii=False, default=str))
        return path

    def summary(self) -> str:
        """A few human lines for the console."""
        c = self.counts()
        rate = self.points_written / self.wall_seconds if self.wall_seconds else 0.0
        lines = [
            f"run {self.run_id}: {len(self.objects)} objects -> collection {self.collection!r}",
            "  " + ", ".join(f"{k} {v}" for k, v in c.items()),
            f"  points written {self.points_written} ({', '.join(f'{m} {n}' for m, n in sorted(self.points_per_modality.items())) or 'none'})"
            f" in {self.wall_seconds:.1f}s ({rate:.1f} points/s)",
        ]
        if self.deleted_stale_objects or self.removed_failed_objects or self.pruned_objects:
            lines.append(f"  replaced units of {self.deleted_stale_objects} changed objects, "
                         f"removed the points of {self.removed_failed_objects} changed objects that now fail or are skipped, "
                         f"pruned {self.pruned_objects} vanished objects")
        if self.error:
            not_written = sum(1 for d in self.dead_letters if d.get("stage") == "write")
            lines.append(f"  RUN STOPPED: {self.error}")
            lines.append(f"  {c['ingested']} objects written completely, {not_written} not written "
                         "(dead letters of stage 'write'); re-run to finish")
        if self.dead_letters:
            lines.append(f"  {len(self.dead_letters)} dead letters ({self.units_failed} failed units); first:")
            for d in self.dead_letters[:5]:
                where = f" [{d.get('position')}]" if d.get("position") else ""
                lines.append(shown_path(f"    {d.get('uri')}{where}: {d.get('stage')}: {d.get('error_type')}: "
                                        f"{d.get('message')}"))
        return "\n".join(lines)
