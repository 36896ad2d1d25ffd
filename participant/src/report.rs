//! The outputs of an experiment: `cells.csv`, `cells.json`, the plots and
//! `report.md`, all rewritten from the finished cells after each cell.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};

use crate::experiment::{CellResult, CellSettings, Experiment, Method, SHARING_KEYS};
use crate::metrics::{significant, write_json};
use crate::plot::{Chart, Line, Series, render};

/// Columns of `cells.csv`, in order.
pub const CSV_COLUMNS: [&str; 38] = [
    "id",
    "method",
    "status",
    "dataset",
    "model",
    "participants",
    "shard_fraction",
    "partition",
    "ordering",
    "theta_u",
    "theta_d",
    "gamma",
    "tau",
    "selection",
    "epsilon",
    "epsilon_per_parameter",
    "upload_values",
    "epochs",
    "lr",
    "lr_decay",
    "batch_size",
    "momentum",
    "eval_every",
    "seed",
    "standalone_sample",
    "accuracy",
    "accuracy_min",
    "accuracy_max",
    "participant_mean",
    "standalone_accuracy",
    "centralized_accuracy",
    "bytes_sent",
    "bytes_received",
    "wall_seconds",
    "epsilon_spent",
    "participants_per_process",
    "peak_rss_per_participant_mib",
    "curve",
];

/// Numeric settings that get a chart of accuracy against them when they
/// vary, and whether that chart's x axis is logarithmic.
const SWEEP_KEYS: [(&str, bool); 7] = [
    ("theta_u", true),
    ("epsilon_per_parameter", true),
    ("epsilon", true),
    ("participants", false),
    ("dirichlet_alpha", true),
    ("theta_d", false),
    ("gamma", true),
];

/// A reference line of a sweep chart: its method, the name of its group,
/// its points and the index of its group.
type ReferenceLine = (Method, String, Vec<(f64, f64)>, usize);

/// Returns the line style of a reference of `method`: dashed for
/// standalone, dotted for centralized.
fn reference_line(method: Method) -> Line {
    if method == Method::Standalone {
        Line::Dashed
    } else {
        Line::Dotted
    }
}

fn settings_map(cell: &CellSettings) -> Map<String, Value> {
    cell.to_map()
}

/// Text of a setting's value as a table shows it.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        Value::Number(number) => match number.as_f64() {
            Some(x) if number.is_f64() => significant(x, 6).to_string(),
            _ => number.to_string(),
        },
        other => other.to_string(),
    }
}

fn partition(cell: &CellSettings) -> String {
    match cell.dirichlet_alpha {
        None => "iid".into(),
        Some(alpha) => format!("dirichlet({})", significant(alpha, 6)),
    }
}

fn optional(value: Option<f64>, digits: usize) -> String {
    value.map_or(String::new(), |v| format!("{v:.digits$}"))
}

/// Returns the finished references of a collaborative cell.
fn references<'a>(
    cell: &CellSettings,
    results: &'a HashMap<String, CellResult>,
) -> (Option<&'a CellResult>, Option<&'a CellResult>) {
    if cell.method != Method::Collaborative {
        return (None, None);
    }
    (
        results.get(&cell.reference(Method::Standalone).id()),
        results.get(&cell.reference(Method::Centralized).id()),
    )
}

/// Quotes a CSV field when it needs it.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn status(
    id: &str,
    results: &HashMap<String, CellResult>,
    failures: &BTreeMap<String, String>,
) -> &'static str {
    if results.contains_key(id) {
        "done"
    } else if failures.contains_key(id) {
        "failed"
    } else {
        "pending"
    }
}

fn csv_row(
    cell: &CellSettings,
    results: &HashMap<String, CellResult>,
    failures: &BTreeMap<String, String>,
) -> Vec<String> {
    let id = cell.id();
    let map = settings_map(cell);
    let reference = cell.method != Method::Collaborative;
    let setting = |key: &str| {
        if reference && SHARING_KEYS.contains(&key) {
            String::new()
        } else {
            match &map[key] {
                Value::Null => String::new(),
                value => show(value),
            }
        }
    };
    let result = results.get(&id);
    let (standalone, centralized) = references(cell, results);
    let mut row = vec![
        id.clone(),
        cell.method.name().to_string(),
        status(&id, results, failures).to_string(),
    ];
    // The settings columns run from "dataset" to "seed"; "partition" is
    // derived from dirichlet_alpha.
    for &key in &CSV_COLUMNS[3..24] {
        row.push(match key {
            "partition" => partition(cell),
            key => setting(key),
        });
    }
    row.push(if cell.method == Method::Standalone {
        cell.standalone_sample.to_string()
    } else {
        String::new()
    });
    let number =
        |value: Option<f64>| value.map_or(String::new(), |v| significant(v, 6).to_string());
    match result {
        Some(r) => {
            row.push(number(Some(r.accuracy)));
            row.push(number(r.accuracy_min));
            row.push(number(r.accuracy_max));
            row.push(number(r.participant_mean));
            row.push(number(standalone.map(|s| s.accuracy)));
            row.push(number(centralized.map(|c| c.accuracy)));
            row.push(r.bytes_sent.to_string());
            row.push(r.bytes_received.to_string());
            row.push(format!("{:.1}", r.wall_seconds));
            row.push(number(r.epsilon_spent));
            row.push(
                r.participants_per_process
                    .map_or(String::new(), |n| n.to_string()),
            );
            row.push(optional(
                r.peak_rss_per_participant_bytes
                    .map(|b| b as f64 / (1 << 20) as f64),
                1,
            ));
            let curve: Vec<String> = r
                .curve
                .iter()
                .map(|(epoch, accuracy)| format!("{epoch}:{:.4}", accuracy))
                .collect();
            row.push(curve.join(" "));
        }
        None => row.extend(std::iter::repeat_n(String::new(), 13)),
    }
    debug_assert_eq!(row.len(), CSV_COLUMNS.len());
    row
}

/// Keys whose values differ among `cells`, in the settings' order.
fn varying_keys(cells: &[&CellSettings]) -> Vec<String> {
    let maps: Vec<Map<String, Value>> = cells.iter().map(|c| settings_map(c)).collect();
    let Some(first) = maps.first() else {
        return Vec::new();
    };
    first
        .keys()
        .filter(|key| {
            let values: BTreeSet<String> =
                maps.iter().map(|m| m[key.as_str()].to_string()).collect();
            values.len() > 1
        })
        .cloned()
        .collect()
}

fn label(cell: &CellSettings, keys: &[String]) -> String {
    let map = settings_map(cell);
    let parts: Vec<String> = keys
        .iter()
        .map(|key| match (key.as_str(), &map[key.as_str()]) {
            ("dirichlet_alpha", Value::Null) => "iid".to_string(),
            ("dirichlet_alpha", value) => format!("dirichlet alpha={}", show(value)),
            ("epsilon" | "epsilon_per_parameter", Value::Null) => "no noise".to_string(),
            ("ordering" | "model" | "selection", value) => show(value),
            (key, value) => format!("{key}={}", show(value)),
        })
        .collect();
    if parts.is_empty() {
        "collaborative".into()
    } else {
        parts.join(", ")
    }
}

/// Points of a result's accuracy curve, x being the epoch.
fn curve_points(result: &CellResult) -> Vec<(f64, f64)> {
    result.curve.iter().map(|&(e, a)| (e as f64, a)).collect()
}

/// Accuracy by epoch of `cells`, one solid line each, with their distinct
/// references dashed (standalone) and dotted (centralized).
fn epochs_chart(
    title: String,
    cells: &[&CellSettings],
    keys: &[String],
    results: &HashMap<String, CellResult>,
) -> Chart {
    let mut series: Vec<Series> = cells
        .iter()
        .enumerate()
        .map(|(n, cell)| {
            let points = curve_points(&results[&cell.id()]);
            Series {
                label: label(cell, keys),
                markers: points.len() == 1,
                points,
                line: Line::Solid,
                colour: n,
                legend: true,
            }
        })
        .collect();
    // A dot at the last epoch marks each cell's final global model, which
    // the tables report; the lines show the local models before it.
    for (n, cell) in cells.iter().enumerate() {
        let result = &results[&cell.id()];
        series.push(Series {
            label: String::new(),
            points: vec![(cell.epochs as f64, result.accuracy)],
            line: Line::Solid,
            colour: n,
            markers: true,
            legend: false,
        });
    }
    for method in [Method::Standalone, Method::Centralized] {
        let mut references: Vec<CellSettings> = Vec::new();
        for cell in cells {
            let reference = cell.reference(method);
            if results.contains_key(&reference.id()) && !references.contains(&reference) {
                references.push(reference);
            }
        }
        let refs: Vec<&CellSettings> = references.iter().collect();
        let distinct = varying_keys(&refs);
        for (n, reference) in refs.iter().enumerate() {
            let points = curve_points(&results[&reference.id()]);
            series.push(Series {
                label: if distinct.is_empty() {
                    method.name().to_string()
                } else {
                    format!("{} ({})", method.name(), label(reference, &distinct))
                },
                markers: points.len() == 1,
                points,
                line: reference_line(method),
                colour: if distinct.is_empty() { 7 } else { n },
                legend: true,
            });
        }
    }
    Chart {
        title,
        x_label: "local epoch".into(),
        y_label: "test accuracy (mean of the local models)".into(),
        log_x: false,
        integer_x: true,
        series,
    }
}

/// Final accuracy of `cells` against the setting `key`, one solid line per
/// combination of `keys`, with the references of each line dashed
/// (standalone) and dotted (centralized) where they differ.
fn sweep_chart(
    title: String,
    key: &str,
    log_x: bool,
    cells: &[&CellSettings],
    keys: &[String],
    results: &HashMap<String, CellResult>,
) -> Chart {
    let x_of = |cell: &CellSettings| settings_map(cell)[key].as_f64().unwrap_or(f64::NAN);
    let mut groups: BTreeMap<String, Vec<&CellSettings>> = BTreeMap::new();
    for cell in cells {
        groups.entry(label(cell, keys)).or_default().push(cell);
    }
    let mut series = Vec::new();
    let mut reference_lines: Vec<ReferenceLine> = Vec::new();
    for (n, (name, mut members)) in groups.into_iter().enumerate() {
        members.sort_by(|a, b| x_of(a).total_cmp(&x_of(b)));
        let points: Vec<(f64, f64)> = members
            .iter()
            .map(|c| (x_of(c), results[&c.id()].accuracy))
            .collect();
        series.push(Series {
            label: name.clone(),
            markers: true,
            points,
            line: Line::Solid,
            colour: n,
            legend: true,
        });
        for method in [Method::Standalone, Method::Centralized] {
            let points: Vec<(f64, f64)> = members
                .iter()
                .filter_map(|c| Some((x_of(c), results.get(&c.reference(method).id())?.accuracy)))
                .collect();
            if points.is_empty() || reference_lines.iter().any(|line| line.2 == points) {
                continue;
            }
            reference_lines.push((method, name.clone(), points, n));
        }
    }
    let several = reference_lines.len() > 2;
    for (method, group, points, colour) in reference_lines {
        series.push(Series {
            label: if several {
                format!("{} ({group})", method.name())
            } else {
                method.name().to_string()
            },
            markers: points.len() == 1,
            points,
            line: reference_line(method),
            colour: if several { colour } else { 7 },
            legend: true,
        });
    }
    Chart {
        title,
        x_label: key.into(),
        y_label: "test accuracy of the final global model".into(),
        log_x,
        integer_x: false,
        series,
    }
}

/// Returns whether `cell` matches every key and value of `filter`.
fn matches(cell: &CellSettings, filter: &Map<String, Value>) -> bool {
    let map = settings_map(cell);
    filter
        .iter()
        .all(|(key, wanted)| match (&map[key.as_str()], wanted) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (a, b) => a == b,
        })
}

fn log_axis(key: &str) -> bool {
    SWEEP_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .is_some_and(|(_, log)| *log)
}

/// Draws every chart the finished cells allow; returns the file stems
/// with their captions, and the errors of charts that failed.
///
/// Each grid gets a chart of accuracy by epoch per model, and a chart of
/// final accuracy against each numeric setting that varies within it.
/// Each `[[plot]]` table of the configuration adds one chart over the cells
/// it selects, across grids.
fn plots(
    root: &Path,
    experiment: &Experiment,
    results: &HashMap<String, CellResult>,
) -> (Vec<(String, String)>, Vec<String>) {
    let dir = root.join("plots");
    let mut drawn = Vec::new();
    let mut errors = Vec::new();
    if let Err(error) = std::fs::create_dir_all(&dir) {
        errors.push(format!("failed to create {}: {error}", dir.display()));
        return (drawn, errors);
    }
    // Charts of an earlier report that this one does not draw would
    // otherwise stay beside the new ones.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "png" || e == "svg") {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let done = |cell: &&CellSettings| {
        cell.method == Method::Collaborative && results.contains_key(&cell.id())
    };
    let name = &experiment.section.name;
    let several_grids = experiment.grids.len() > 1;
    let mut charts: Vec<(String, Chart, String)> = Vec::new();
    for (number, grid) in experiment.grids.iter().enumerate() {
        let members: Vec<&CellSettings> = grid
            .iter()
            .map(|&i| &experiment.cells[i])
            .filter(done)
            .collect();
        let models: BTreeSet<&str> = members.iter().map(|c| c.model.name()).collect();
        for model in models {
            let cells: Vec<&CellSettings> = members
                .iter()
                .copied()
                .filter(|c| c.model.name() == model)
                .collect();
            let keys = varying_keys(&cells);
            let suffix = if several_grids {
                format!("-grid{}", number + 1)
            } else {
                String::new()
            };
            let about = if keys.is_empty() {
                String::new()
            } else {
                format!(" by {}", keys.join(", "))
            };
            charts.push((
                format!("accuracy-vs-epochs-{model}{suffix}"),
                epochs_chart(format!("{name}: {model}{about}, accuracy by epoch"), &cells, &keys, results),
                format!(
                    "Test accuracy of the {model} after each evaluated epoch{about}: the mean over participants of their local models before the next download (solid), with the standalone mean (dashed) and the centralized model (dotted). The dot at the last epoch is the final global model, as in the tables."
                ),
            ));
            for (key, log_x) in SWEEP_KEYS {
                if !keys.iter().any(|k| k == key) {
                    continue;
                }
                let swept: Vec<&CellSettings> = cells
                    .iter()
                    .copied()
                    .filter(|c| !settings_map(c)[key].is_null())
                    .collect();
                let others: Vec<String> = varying_keys(&swept)
                    .into_iter()
                    .filter(|k| k != key)
                    .collect();
                charts.push((
                    format!("accuracy-vs-{}-{model}{suffix}", key.replace('_', "-")),
                    sweep_chart(format!("{name}: {model}, final accuracy against {key}"), key, log_x, &swept, &others, results),
                    format!(
                        "Final test accuracy of the global {model} model against {key} (solid), with the standalone mean (dashed) and the centralized model (dotted) of the same training settings."
                    ),
                ));
            }
        }
    }
    for (number, spec) in experiment.plots.iter().enumerate() {
        let cells: Vec<&CellSettings> = experiment
            .cells
            .iter()
            .filter(done)
            .filter(|c| matches(c, &spec.filter))
            .collect();
        let stem = format!(
            "plot{}-accuracy-vs-{}",
            number + 1,
            spec.x.replace('_', "-")
        );
        if cells.is_empty() {
            errors.push(format!(
                "{stem}: no finished collaborative cell matches its where table"
            ));
            continue;
        }
        let keys = match &spec.series {
            Some(keys) => keys.clone(),
            None => varying_keys(&cells)
                .into_iter()
                .filter(|k| *k != spec.x)
                .collect(),
        };
        let title = spec
            .title
            .clone()
            .unwrap_or_else(|| format!("{name}: accuracy against {}", spec.x));
        let chart = if spec.x == "epoch" {
            epochs_chart(title.clone(), &cells, &keys, results)
        } else {
            let swept: Vec<&CellSettings> = cells
                .iter()
                .copied()
                .filter(|c| !settings_map(c)[spec.x.as_str()].is_null())
                .collect();
            sweep_chart(
                title.clone(),
                &spec.x,
                log_axis(&spec.x),
                &swept,
                &keys,
                results,
            )
        };
        charts.push((stem, chart, format!("{title} (solid), with the standalone mean (dashed) and the centralized model (dotted).")));
    }

    for (stem, chart, caption) in charts {
        match render(&chart, &dir.join(&stem)) {
            Ok(()) => drawn.push((stem, caption)),
            Err(error) => errors.push(format!("{stem}: {error:#}")),
        }
    }
    (drawn, errors)
}

/// Year, month and day of a Unix time, in UTC.
fn utc_date(seconds: u64) -> (i64, u32, u32, u64) {
    let days = (seconds / 86_400) as i64;
    // Civil-from-days conversion over 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, seconds % 86_400)
}

fn timestamp(seconds: u64) -> String {
    let (year, month, day, rest) = utc_date(seconds);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        rest / 60 % 60
    )
}

/// Describes the machine in one line: cores, CPU model and memory.
fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!(", {:.0} GiB of memory", kib / (1 << 20) as f64))
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}){memory}, {}", std::env::consts::OS)
}

fn markdown_table(header: &[String], rows: &[Vec<String>]) -> String {
    let mut text = format!(
        "| {} |\n|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    );
    for row in rows {
        let _ = writeln!(text, "| {} |", row.join(" | "));
    }
    text
}

/// Writes `cells.csv`, `cells.json`, the plots and `report.md` into `root`.
pub fn write_outputs(
    root: &Path,
    experiment: &Experiment,
    results: &HashMap<String, CellResult>,
    failures: &BTreeMap<String, String>,
    command: &str,
) -> anyhow::Result<()> {
    let mut csv = CSV_COLUMNS.join(",") + "\n";
    for cell in &experiment.cells {
        let row: Vec<String> = csv_row(cell, results, failures)
            .iter()
            .map(|f| csv_field(f))
            .collect();
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let path = root.join("cells.csv");
    std::fs::write(&path, csv).with_context(|| format!("failed to write {}", path.display()))?;

    let json: Vec<Value> = experiment
        .cells
        .iter()
        .map(|cell| {
            let id = cell.id();
            let (standalone, centralized) = references(cell, results);
            serde_json::json!({
                "id": id,
                "status": status(&id, results, failures),
                "settings": cell,
                "result": results.get(&id),
                "error": failures.get(&id),
                "standalone_accuracy": standalone.map(|r| r.accuracy),
                "centralized_accuracy": centralized.map(|r| r.accuracy),
            })
        })
        .collect();
    write_json(&root.join("cells.json"), &json)?;

    let (plots, plot_errors) = plots(root, experiment, results);
    let report = markdown(experiment, results, failures, command, &plots, &plot_errors);
    let path = root.join("report.md");
    std::fs::write(&path, report).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

/// Returns a Markdown section with the mean and spread over seeds of the
/// collaborative cells that differ only in their seed, or nothing when no
/// seed varies.
fn seed_means(
    collaborative: &[&CellSettings],
    keys: &[String],
    results: &HashMap<String, CellResult>,
) -> String {
    if !keys.iter().any(|k| k == "seed") {
        return String::new();
    }
    let others: Vec<String> = keys.iter().filter(|k| *k != "seed").cloned().collect();
    let mut groups: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for cell in collaborative {
        let Some(result) = results.get(&cell.id()) else {
            continue;
        };
        let name = if others.is_empty() {
            "all cells".to_string()
        } else {
            label(cell, &others)
        };
        if !groups.contains_key(&name) {
            order.push(name.clone());
        }
        groups.entry(name).or_default().push(result.accuracy);
    }
    let mut rows = Vec::new();
    for name in order {
        let accuracies = &groups[&name];
        let count = accuracies.len() as f64;
        let mean = accuracies.iter().sum::<f64>() / count;
        // Sample standard deviation; one seed has none.
        let spread = if accuracies.len() > 1 {
            let squares: f64 = accuracies.iter().map(|a| (a - mean).powi(2)).sum();
            format!("{:.4}", (squares / (count - 1.0)).sqrt())
        } else {
            "-".to_string()
        };
        let low = accuracies.iter().copied().fold(f64::INFINITY, f64::min);
        let high = accuracies.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        rows.push(vec![
            name,
            accuracies.len().to_string(),
            format!("**{mean:.4}**"),
            spread,
            format!("{low:.4} to {high:.4}"),
        ]);
    }
    let header: Vec<String> = [
        "cells",
        "seeds",
        "mean accuracy",
        "standard deviation",
        "range",
    ]
    .map(String::from)
    .to_vec();
    format!(
        "## Mean over seeds\n\nFinal global accuracy of the cells that differ only in their seed.\n\n{}\n",
        markdown_table(&header, &rows)
    )
}

fn markdown(
    experiment: &Experiment,
    results: &HashMap<String, CellResult>,
    failures: &BTreeMap<String, String>,
    command: &str,
    plots: &[(String, String)],
    plot_errors: &[String],
) -> String {
    let mut text = format!("# {}\n\n", experiment.section.name);
    if !experiment.section.description.is_empty() {
        let _ = writeln!(text, "{}\n", experiment.section.description.trim());
    }
    let finished_at = results.values().map(|r| r.finished_at).max().unwrap_or(0);
    let wall: f64 = results.values().map(|r| r.wall_seconds).sum();
    let _ = writeln!(
        text,
        "- Command: `{command}`\n- Machine: {}\n- Cells: {} of {} finished{}; {:.1} minutes of cell time{}\n",
        machine(),
        results.len(),
        experiment.cells.len(),
        if failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed", failures.len())
        },
        wall / 60.0,
        if finished_at > 0 {
            format!("; last cell finished {}", timestamp(finished_at))
        } else {
            String::new()
        },
    );

    let collaborative: Vec<&CellSettings> = experiment
        .cells
        .iter()
        .filter(|c| c.method == Method::Collaborative)
        .collect();
    let keys = varying_keys(&collaborative);
    let keys = if keys.is_empty() {
        vec!["model".to_string()]
    } else {
        keys
    };
    let private = collaborative.iter().any(|c| c.private());
    if !collaborative.is_empty() {
        text.push_str("## Collaborative cells\n\n");
        text.push_str(
            "Accuracy is the test accuracy of the final global model; participants' mean is the mean test accuracy of each participant's own model when it finished. Standalone is the mean over the sampled shards of a model trained on one shard alone; centralized is one model trained on the union of the shards. MB sent is per participant.\n\n",
        );
        let mut header: Vec<String> = keys.clone();
        header.extend(
            [
                "accuracy",
                "participants' mean",
                "standalone",
                "centralized",
                "MB sent",
                "minutes",
            ]
            .map(String::from),
        );
        if private {
            header.push("epsilon spent".into());
        }
        let mut rows = Vec::new();
        for cell in &collaborative {
            let map = settings_map(cell);
            let mut row: Vec<String> = keys
                .iter()
                .map(|k| match (k.as_str(), &map[k.as_str()]) {
                    ("dirichlet_alpha", Value::Null) => "iid".to_string(),
                    ("epsilon" | "epsilon_per_parameter", Value::Null) => "no noise".to_string(),
                    (_, value) => show(value),
                })
                .collect();
            let id = cell.id();
            let (standalone, centralized) = references(cell, results);
            match results.get(&id) {
                Some(r) => {
                    row.push(format!("**{:.4}**", r.accuracy));
                    row.push(optional(r.participant_mean, 4));
                    row.push(standalone.map_or("-".into(), |s| format!("{:.4}", s.accuracy)));
                    row.push(centralized.map_or("-".into(), |c| format!("{:.4}", c.accuracy)));
                    row.push(format!(
                        "{:.2}",
                        r.bytes_sent as f64 / 1e6 / cell.participants.max(1) as f64
                    ));
                    row.push(format!("{:.1}", r.wall_seconds / 60.0));
                    if private {
                        row.push(
                            r.epsilon_spent
                                .map_or("-".into(), |e| significant(e, 4).to_string()),
                        );
                    }
                }
                None => {
                    let state = if failures.contains_key(&id) {
                        "failed"
                    } else {
                        "pending"
                    };
                    row.push(state.into());
                    row.extend(std::iter::repeat_n(
                        String::new(),
                        header.len() - keys.len() - 1,
                    ));
                }
            }
            rows.push(row);
        }
        text.push_str(&markdown_table(&header, &rows));
        text.push('\n');
    }

    text.push_str(&seed_means(&collaborative, &keys, results));

    let references: Vec<&CellSettings> = experiment
        .cells
        .iter()
        .filter(|c| c.method != Method::Collaborative)
        .collect();
    if !references.is_empty() {
        text.push_str("## Reference cells\n\n");
        let header: Vec<String> = [
            "method",
            "model",
            "participants",
            "partition",
            "epochs",
            "shards trained",
            "accuracy",
            "range",
            "minutes",
        ]
        .map(String::from)
        .to_vec();
        let rows: Vec<Vec<String>> = references
            .iter()
            .map(|cell| {
                let shards = match cell.method {
                    Method::Standalone => cell.standalone_sample.to_string(),
                    _ => "union".into(),
                };
                let mut row = vec![
                    cell.method.name().to_string(),
                    cell.model.name().to_string(),
                    cell.participants.to_string(),
                    partition(cell),
                    cell.epochs.to_string(),
                    shards,
                ];
                match results.get(&cell.id()) {
                    Some(r) => {
                        row.push(format!("{:.4}", r.accuracy));
                        row.push(match (r.accuracy_min, r.accuracy_max) {
                            (Some(lo), Some(hi)) if hi > lo => format!("{lo:.4} to {hi:.4}"),
                            _ => "-".into(),
                        });
                        row.push(format!("{:.1}", r.wall_seconds / 60.0));
                    }
                    None => {
                        row.push(
                            if failures.contains_key(&cell.id()) {
                                "failed"
                            } else {
                                "pending"
                            }
                            .into(),
                        );
                        row.extend([String::new(), String::new()]);
                    }
                }
                row
            })
            .collect();
        text.push_str(&markdown_table(&header, &rows));
        text.push('\n');
    }

    if !plots.is_empty() || !plot_errors.is_empty() {
        text.push_str("## Plots\n\n");
        for (stem, caption) in plots {
            let _ = writeln!(
                text,
                "![{stem}](plots/{stem}.png)\n\n{caption} ([SVG](plots/{stem}.svg))\n"
            );
        }
        for error in plot_errors {
            let _ = writeln!(text, "- Plot not drawn: {error}");
        }
        if !plot_errors.is_empty() {
            text.push('\n');
        }
    }

    if let Some(first) = collaborative.first() {
        let map = settings_map(first);
        let shared: Vec<String> = map
            .iter()
            .filter(|(key, value)| {
                !keys.contains(key) && !value.is_null() && key.as_str() != "method"
            })
            .map(|(key, value)| format!("`{key} = {}`", show(value)))
            .collect();
        let _ = writeln!(
            text,
            "## Settings shared by every collaborative cell\n\n{}\n",
            shared.join(", ")
        );
    }

    let memory: Vec<(usize, u64)> = results
        .values()
        .filter_map(|r| {
            Some((
                r.participants_per_process?,
                r.peak_rss_per_participant_bytes?,
            ))
        })
        .collect();
    if !memory.is_empty() {
        let hosting: BTreeSet<usize> = memory.iter().map(|m| m.0).collect();
        let hosting: Vec<String> = hosting.iter().map(|n| n.to_string()).collect();
        let peak = memory.iter().map(|m| m.1).max().unwrap_or(0);
        let _ = writeln!(
            text,
            "## Processes and memory\n\nEach participant process hosted {} participant(s), each with its own model, shard and gRPC connection. The largest peak resident memory of a participant process divided by the participants it hosted was {:.0} MiB.\n",
            hosting.join(" or "),
            peak as f64 / (1 << 20) as f64
        );
    }

    if !failures.is_empty() {
        text.push_str("## Failed cells\n\n");
        for (id, error) in failures {
            let _ = writeln!(text, "- `{id}`: {error}");
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_from_unix_time() {
        assert_eq!(timestamp(0), "1970-01-01 00:00 UTC");
        assert_eq!(timestamp(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(timestamp(1_796_360_820), "2026-12-04 05:07 UTC");
    }

    #[test]
    fn seeds_are_averaged_per_setting() {
        let text = "[experiment]\nname = \"t\"\nreferences = false\n[[grid]]\ntheta_u = [1.0, 0.1]\nseed = [1, 2, 3]\n";
        let experiment = crate::experiment::parse(text, "x.toml").unwrap();
        let mut results = HashMap::new();
        for cell in &experiment.cells {
            let accuracy = if cell.theta_u == 1.0 {
                0.88 + 0.02 * cell.seed as f64
            } else {
                0.80
            };
            results.insert(
                cell.id(),
                CellResult {
                    id: cell.id(),
                    settings: cell.clone(),
                    accuracy,
                    accuracy_min: None,
                    accuracy_max: None,
                    participant_mean: None,
                    curve: vec![(1, accuracy)],
                    bytes_sent: 0,
                    bytes_received: 0,
                    wall_seconds: 1.0,
                    epsilon_spent: None,
                    participants_per_process: None,
                    peak_rss_per_participant_bytes: None,
                    global_version: None,
                    finished_at: 0,
                },
            );
        }
        let cells: Vec<&CellSettings> = experiment.cells.iter().collect();
        let keys = varying_keys(&cells);
        let section = seed_means(&cells, &keys, &results);
        assert!(
            section.contains("| theta_u=1 | 3 | **0.9200** | 0.0200 | 0.9000 to 0.9400 |"),
            "{section}"
        );
        assert!(
            section.contains("| theta_u=0.1 | 3 | **0.8000** | 0.0000 | 0.8000 to 0.8000 |"),
            "{section}"
        );
        let without_seeds: Vec<String> = keys.into_iter().filter(|k| k != "seed").collect();
        assert!(seed_means(&cells, &without_seeds, &results).is_empty());
    }

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
