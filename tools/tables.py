"""The text tables the command lines print: a paper table with each cell's interval beside it, one data set's
columns for several runs, the paired differences, and the one-line summary of what was scored and skipped."""
from datasets import REGISTRY
from tools.intervals import paired_differences


def _fmt(v):
    return "-" if v is None else f"{v:.2f}"


def fmt_ci(v, ci):
    """A percent with its interval beside it: 93.75 [87.5, 98.9]."""
    return _fmt(v) if v is None or not ci else f"{v:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def render_table(title, column_groups, rows):
    """column_groups [(group title, [column])], rows [(label, [cell])] (cells of all groups in order) -> text."""
    starts = [sum(len(cols) for _, cols in column_groups[:g]) for g in range(len(column_groups))]
    widths = [[max(len(c), 7, *(len(str(cells[k + i])) for _, cells in rows)) for i, c in enumerate(cols)]
              for (_, cols), k in zip(column_groups, starts)]
    spans = [sum(w) + len(w) - 1 for w in widths]
    lines = [[""] + [g[:s].ljust(s) for (g, _), s in zip(column_groups, spans)],
             ["Method"] + [" ".join(c.rjust(w) for c, w in zip(cols, ws))
                           for (_, cols), ws in zip(column_groups, widths)]]
    for label, cells in rows:
        parts, k = [label], 0
        for ws in widths:
            parts.append(" ".join(str(c).rjust(w) for c, w in zip(cells[k:k + len(ws)], ws)))
            k += len(ws)
        lines.append(parts)
    first = max(24, max(len(r[0]) for r in lines) + 1)
    return "\n".join([title] + [" | ".join([r[0].ljust(first)] + r[1:]) for r in lines])


def format_table(name, rows, cis=None):
    """One data set's columns for several runs: rows {label: {column: percent}} (e.g. zero_shot / few_shot), and
    their intervals cis {label: {column: [low, high]}} when given."""
    cols, cis = [c for c, _, _ in REGISTRY[name].columns], cis or {}
    title = REGISTRY[name].title
    return render_table(f"{title}: accuracy (%)" + (" [95% bootstrap CI]" if cis else ""),
                        [(title, cols)],
                        [(label, [fmt_ci(m.get(c), cis.get(label, {}).get(c)) for c in cols])
                         for label, m in rows.items()])


def show_differences(results, labels):
    """{data set: {"<label> - <first label>": {column: {difference, ci, n}}}} of every run against the first, and the
    printed tables."""
    out, text = {}, []
    for name in results[labels[0]]:
        if not REGISTRY[name].columns:                      # a bias set: its own table
            continue
        diffs = {f"{m} - {labels[0]}": paired_differences(name, results[labels[0]][name], results[m][name])
                 for m in labels[1:]}
        out[name] = diffs
        cols, title = [c for c, _, _ in REGISTRY[name].columns], REGISTRY[name].title
        text.append(render_table(f"{title}: paired difference, points [95% bootstrap CI, same items and "
                                 "resamples]", [(title, cols)],
                                 [(row, [fmt_ci(d[c]["difference"], d[c]["ci"]) if d else "-" for c in cols])
                                  for row, d in diffs.items()]))
    return out, "\n\n".join(text)


def summary_line(name, res, report):
    other = f" ({report['other_split']} records of other splits left out)" if report.get("other_split") else ""
    other += f" [{report['form']} form]" if report.get("form") else ""
    other += f" ({report['over_cap']} over the per-file cap)" if report.get("over_cap") else ""
    return (f"{name}: {report['records']} records{other} -> {res['n_items']} items scored; skipped: "
            f"{report['malformed']} malformed records, {report['missing_images']} items with missing images "
            f"({report['n_missing_files']} files), {res['unreadable']} items with unreadable images; "
            f"ties with a wrong candidate (counted wrong): {res.get('ties', 0)}"
            + (f"; duplicate records (scored as loaded): {report['duplicates']}" if report.get("duplicates") else "")
            + (f"; UNet rows per item: {res['rows_per_item']:.1f}" if res.get("rows_per_item") else ""))
