//! `--plot`: replicas and p95 over time for each policy, one PNG.
//!
//! Text needs a TrueType font: `--font`, else DejaVuSans where Debian's fonts-dejavu
//! puts it. Without one the chart is drawn without any text (the colours are listed
//! in docs/autoscaling.md), so the simulator needs no font to run.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::model::RunResult;

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),   // kestrel: red
    RGBColor(31, 119, 180),  // blue
    RGBColor(44, 160, 44),   // green
    RGBColor(255, 127, 14),  // orange
    RGBColor(127, 127, 127), // grey
    RGBColor(148, 103, 189),
];

const DEFAULT_FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn load_font(font: Option<&Path>) -> bool {
    let candidates: Vec<&Path> = match font {
        Some(p) => vec![p],
        None => DEFAULT_FONTS.iter().map(Path::new).collect(),
    };
    for p in candidates {
        if let Ok(bytes) = std::fs::read(p) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Two panels sharing the time axis: replicas (top) and 30 s p95 against the target
/// (bottom, capped at 4× the target), one line per policy.
pub fn draw(
    path: &Path,
    font: Option<&Path>,
    runs: &[(String, RunResult)],
    target_ms: f64,
) -> DrawResult {
    let text = load_font(font);
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(320);
    let t_max = runs
        .iter()
        .filter_map(|(_, r)| r.timeline.last().map(|p| p.0))
        .fold(1.0, f64::max);
    let r_max = runs
        .iter()
        .flat_map(|(_, r)| r.timeline.iter().map(|p| p.1))
        .max()
        .unwrap_or(1) as f64
        + 1.0;
    let l_max = target_ms * 4.0;

    let mut replicas = ChartBuilder::on(&top);
    replicas
        .margin(10)
        .x_label_area_size(if text { 30 } else { 5 })
        .y_label_area_size(if text { 50 } else { 5 });
    if text {
        replicas.caption("replicas over time", ("sans-serif", 20));
    }
    let mut chart = replicas.build_cartesian_2d(0.0..t_max, 0.0..r_max)?;
    let mut mesh = chart.configure_mesh();
    mesh.max_light_lines(0);
    if text {
        mesh.x_desc("seconds").y_desc("replicas");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    for (i, (name, r)) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let series = chart.draw_series(LineSeries::new(
            r.timeline.iter().map(|p| (p.0, p.1 as f64)),
            color.stroke_width(2),
        ))?;
        if text {
            series.label(name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }

    let mut latency = ChartBuilder::on(&bottom);
    latency
        .margin(10)
        .x_label_area_size(if text { 30 } else { 5 })
        .y_label_area_size(if text { 50 } else { 5 });
    if text {
        latency.caption(
            format!("p95 latency over 30 s windows (ms, capped at {l_max:.0}; dashed: target)"),
            ("sans-serif", 20),
        );
    }
    let mut chart = latency.build_cartesian_2d(0.0..t_max, 0.0..l_max)?;
    let mut mesh = chart.configure_mesh();
    mesh.max_light_lines(0);
    if text {
        mesh.x_desc("seconds").y_desc("p95 ms");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;
    chart.draw_series(DashedLineSeries::new(
        vec![(0.0, target_ms), (t_max, target_ms)],
        8,
        6,
        BLACK.stroke_width(1),
    ))?;
    for (i, (_, r)) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart.draw_series(LineSeries::new(
            r.timeline
                .iter()
                .filter_map(|p| p.2.map(|l| (p.0, l.min(l_max)))),
            color.stroke_width(1),
        ))?;
    }
    root.present()?;
    Ok(())
}
