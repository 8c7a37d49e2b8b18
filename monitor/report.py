"""Self-contained HTML report of one monitoring window against its reference.

The page has driftloop's own results first (each signal's statistic, p-value and
threshold, the new frequent tokens, typical drifted texts and the accuracy
estimate), then an Evidently data-drift report on the same window. Evidently
compares the window's events with the version's validation split, column by
column: the text, its token count in the model's tokenizer, the confidence and
the predicted label. Evidently embeds its JavaScript in the page, so the report
opens offline.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

from monitor.config import Config, resolve_model_path
from monitor.errors import NotFoundError
from monitor.store import Store

# Cap on the rows handed to Evidently per side, which bounds the report's run time.
EVIDENTLY_MAX_ROWS = 2000


def load_window(store: Store, window_id: str) -> dict[str, Any]:
    window = store.window(window_id)
    if window is None:
        raise NotFoundError(f"window {window_id!r} not found; list windows with GET /v1/windows")
    return window


def render_window_report(config: Config, store: Store, window_id: str, *, evidently: bool = True) -> str:
    """Return the HTML report of ``window_id``; ``evidently=False`` leaves out the Evidently part."""
    from retrain.registry import Registry

    window = load_window(store, window_id)
    events = store.window_events(window_id)
    sections = [_summary_section(window, events), _signals_section(window), _explanation_section(window)]
    if evidently:
        registry = Registry(store, config.shared_path)
        version = window.get("version")
        if version is None:
            sections.append("<h2>Evidently</h2><p>The window has no adapter version, so it has no reference.</p>")
        else:
            sections.append(_evidently_section(config, registry.get(version).adapter_dir,
                                               registry.profile_dir(version), events))
    title = f"driftloop window {window_id}"
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "".join(sections) + "</body></html>"
    )


def write_window_report(config: Config, store: Store, window_id: str, output: Path | None = None, *,
                        evidently: bool = True) -> Path:
    """Write the report to ``output`` (default ``<state_dir>/reports/<window>.html``) and return the path."""
    page = render_window_report(config, store, window_id, evidently=evidently)
    path = Path(output) if output else config.state_path / "reports" / f"{window_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    ".drift{color:#b00020;font-weight:bold}iframe{width:100%;height:1600px;border:1px solid #ccc}"
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(value)}</td>" for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_section(window: dict, events: list[dict]) -> str:
    verdict = ("<span class=\"drift\">drift in " + html.escape(", ".join(window["drifted_signals"])) + "</span>"
               if window["drifted"] else html.escape("no drift" if window["status"] == "ok" else window["status"]))
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(window["started_at"]))
    ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(window["ended_at"]))
    rows = [
        ["verdict", verdict],
        ["adapter version", _cell(window.get("version"))],
        ["events (sampled)", f"{window['n_events']} ({window['n_sampled']})"],
        ["first and last event", f"{started} to {ended}"],
        ["mean confidence", _cell(window.get("mean_confidence"))],
        ["latency p50 / p99 (ms)", f"{_cell(window.get('latency_p50_ms'))} / {_cell(window.get('latency_p99_ms'))}"],
        ["labelled events, realized accuracy",
         f"{_cell(window.get('labelled_events'))}, {_cell(window.get('realized_accuracy'))}"],
        ["events stored for this window", str(len(events))],
    ]
    body = "".join(f"<tr><th>{html.escape(name)}</th><td>{value}</td></tr>" for name, value in rows)
    return f"<h2>Summary</h2><table>{body}</table>"


def _signals_section(window: dict) -> str:
    rows = [
        [result["signal"], result["status"], "yes" if result["drifted"] else "no",
         result["statistic"], result["p_value"], _decision_rule(result), result["n"]]
        for result in window["results"]
    ]
    table = _table(["signal", "status", "drift", "statistic", "p-value", "drift when", "sampled"], rows)
    return "<h2>Signals</h2>" + table


def _decision_rule(result: dict) -> str:
    """Return the comparison that decided the signal, because confidence compares its statistic, not its p-value."""
    if result["signal"] == "confidence":
        return f"statistic (drop in mean confidence) >= {result['threshold']}"
    return f"p-value < {result['threshold']}"


def _explanation_section(window: dict) -> str:
    details = {result["signal"]: result.get("details") or {} for result in window["results"]}
    parts = ["<h2>Explanation</h2>"]
    tokens = details.get("vocabulary", {}).get("new_frequent_tokens") or []
    counts = details.get("vocabulary", {}).get("new_frequent_token_counts") or []
    if tokens:
        rows = [[token, counts[index] if index < len(counts) else None] for index, token in enumerate(tokens)]
        parts.append("<h3>New frequent tokens</h3>" + _table(["token", "count in window"], rows))
    novel = details.get("novelty", {}).get("typical_examples") or []
    if novel:
        rows = [[example.get("text"), example.get("score")] for example in novel]
        parts.append("<h3>Texts farthest from the training data</h3>"
                     + _table(["text", "cosine distance to the nearest training text"], rows))
    examples = details.get("domain_classifier", {}).get("typical_examples") or []
    if examples:
        rows = [[example.get("text"), example.get("score")] for example in examples]
        parts.append("<h3>Typical drifted texts</h3>" + _table(["text", "production-likeness"], rows))
    estimate = window.get("accuracy_estimate")
    if estimate:
        parts.append("<h3>Label-free accuracy estimate</h3>" + _table(
            ["status", "estimate", "lower", "upper", "level", "method"],
            [[estimate["status"], estimate["estimate"], estimate["lower"], estimate["upper"], estimate["level"],
              estimate["method"]]],
        ))
    parts.append("<h3>All details</h3><pre>" + html.escape(json.dumps(details, indent=2)) + "</pre>")
    return "".join(parts)


def _evidently_section(config: Config, adapter_dir: Path, profile_dir: Path, events: list[dict]) -> str:
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset
    from transformers import AutoTokenizer

    from monitor.reference import ReferenceProfile
    from retrain.registry import read_examples

    if not events:
        return "<h2>Evidently</h2><p>The window has no stored events.</p>"
    profile = ReferenceProfile.load(profile_dir)
    validation = read_examples(Path(adapter_dir) / "validation.jsonl")
    if len(validation) != len(profile.val_confidences):
        return ("<h2>Evidently</h2><p>The version's validation file and its profile disagree in length; "
                "rebuild the profile to compare.</p>")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.base))

    def frame(texts: list[str], confidences, labels) -> pd.DataFrame:
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
        return pd.DataFrame({"text": texts, "token_count": counts, "confidence": list(confidences),
                             "predicted_label": list(labels)})

    reference = frame([text for text, _ in validation], profile.val_confidences, profile.val_predicted_labels)
    current = frame([event["text"] for event in events], [event["confidence"] for event in events],
                    [event["predicted_label"] for event in events])
    reference = reference.sample(n=min(len(reference), EVIDENTLY_MAX_ROWS), random_state=0)
    current = current.sample(n=min(len(current), EVIDENTLY_MAX_ROWS), random_state=0)
    definition = DataDefinition(text_columns=["text"], numerical_columns=["token_count", "confidence"],
                                categorical_columns=["predicted_label"])
    snapshot = Report([DataDriftPreset()]).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    page = snapshot.get_html_str(as_iframe=False)
    return ("<h2>Evidently data drift (window against the validation split)</h2>"
            f"<iframe srcdoc=\"{html.escape(page, quote=True)}\"></iframe>")
