//! `chart RESULTS.jsonl OUT.svg`: throughput against connection count, one line per
//! server, from the `echo-pp-<connections>` scenarios (medians over rounds).
//!
//! SVG only. Text needs no system fonts: without plotters' `ttf` feature, labels are
//! laid out with its built-in size estimate and drawn by the SVG viewer.

use std::process::ExitCode;

use plotters::prelude::*;
use sockpool_bench::{median_of, read_runs, servers, Run};

/// Line colours, readable on white (the first is sockpool's: it is run first).
const COLORS: [RGBColor; 5] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

/// Scenarios `echo-pp-16`, `echo-pp-64`, ...: ping-pong echo at N connections.
const PREFIX: &str = "echo-pp-";

/// (log2 connections, median msgs/s) for `server`, sorted by connections.
fn points(runs: &[Run], server: &str) -> Vec<(f64, f64)> {
    let mut scenarios: Vec<(u32, &str)> = runs
        .iter()
        .filter_map(|r| {
            Some((
                r.scenario.strip_prefix(PREFIX)?.parse().ok()?,
                r.scenario.as_str(),
            ))
        })
        .collect();
    scenarios.sort();
    scenarios.dedup();
    scenarios
        .into_iter()
        .filter_map(|(conns, scenario)| {
            // Plotted at log2(connections): evenly spaced doublings, labelled in connections.
            Some((
                f64::from(conns).log2(),
                median_of(runs, server, scenario, "/msgs_per_s")?,
            ))
        })
        .collect()
}

fn draw(runs: &[Run], out: &str) -> Result<(), Box<dyn std::error::Error>> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = servers(runs)
        .into_iter()
        .map(|s| {
            let p = points(runs, &s);
            (s, p)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let all = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x_min, mut x_max, mut y_max) = (f64::MAX, 1.0f64, 1.0f64);
    for &(x, y) in all {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    if lines.is_empty() {
        return Err(format!("no {PREFIX}<connections> scenario in the results").into());
    }
    let root = SVGBackend::new(out, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Echo ping-pong, 64-byte messages, server on one core",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x_min - 0.5..x_max + 0.5, 0.0..y_max * 1.3)?;
    chart
        .configure_mesh()
        .x_labels((x_max - x_min) as usize + 2)
        .x_desc("connections")
        .y_desc("messages/s")
        .light_line_style(WHITE)
        .x_label_formatter(&|x| format!("{:.0}", x.exp2()))
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()?;
    for (i, (server, pts)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(server.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, out] = args.as_slice() else {
        eprintln!("usage: chart RESULTS.jsonl OUT.svg");
        return ExitCode::from(2);
    };
    let result = read_runs(input)
        .map_err(Into::into)
        .and_then(|runs| draw(&runs, out));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chart: {e}");
            ExitCode::FAILURE
        }
    }
}
