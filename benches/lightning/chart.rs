//! A small SVG chart of time per shape per target (log scale), no dependencies.

use std::fmt::Write as _;

use crate::report::Row;

/// Text as SVG character data (runtime names such as `wgpu<wgsl>` hold `<`).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];

/// Writes one horizontal bar per measured row, grouped by (op, shape, dtype), a color per target.
pub fn write_svg(rows: &[Row], path: &std::path::Path) -> std::io::Result<()> {
    let measured: Vec<&Row> = rows.iter().filter(|r| r.time.is_some()).collect();
    let mut targets: Vec<&str> = measured.iter().map(|r| r.target.as_str()).collect();
    targets.dedup();
    let mut groups: Vec<String> = Vec::new();
    for r in &measured {
        let key = format!("{} {} {}", r.op, r.shape_label(), r.dtype);
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    let times: Vec<f64> = measured
        .iter()
        .map(|r| r.time.unwrap().as_secs_f64() * 1e3)
        .collect();
    let (lo, hi) = times
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &t| (a.min(t), b.max(t)));
    let (lo, hi) = (
        (lo.max(1e-4)).log10().floor(),
        (hi.max(1e-3)).log10().ceil().max(lo.log10() + 1.0),
    );
    let bar = 14.0;
    let group_h = bar * targets.len().max(1) as f64 + 10.0;
    let (left, width) = (260.0, 560.0);
    let height = 60.0 + group_h * groups.len() as f64 + 20.0 * targets.len() as f64;
    let x = |ms: f64| left + (ms.max(1e-4).log10() - lo) / (hi - lo) * width;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"18\" font-size=\"14\">lightning-attention: median time per call (ms, log scale)</text>\n",
        left + width + 40.0
    );
    for p in (lo as i32)..=(hi as i32) {
        let gx = x(10f64.powi(p));
        let _ = writeln!(
            svg,
            "<line x1=\"{gx}\" y1=\"30\" x2=\"{gx}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{gx}\" y=\"28\" text-anchor=\"middle\">1e{p}</text>",
            height - 20.0 * targets.len() as f64
        );
    }
    for (gi, group) in groups.iter().enumerate() {
        let y0 = 40.0 + gi as f64 * group_h;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{group}</text>",
            left - 6.0,
            y0 + group_h / 2.0
        );
        for (ti, target) in targets.iter().enumerate() {
            let found = measured.iter().find(|r| {
                r.target == *target && format!("{} {} {}", r.op, r.shape_label(), r.dtype) == *group
            });
            if let Some(r) = found {
                let ms = r.time.unwrap().as_secs_f64() * 1e3;
                let y = y0 + ti as f64 * bar;
                let _ = writeln!(
                    svg,
                    "<rect x=\"{left}\" y=\"{y}\" width=\"{}\" height=\"{}\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{ms:.3}</text>",
                    (x(ms) - left).max(1.0),
                    bar - 2.0,
                    COLORS[ti % COLORS.len()],
                    x(ms) + 3.0,
                    y + bar - 4.0
                );
            }
        }
    }
    for (ti, target) in targets.iter().enumerate() {
        let y = height - 20.0 * (targets.len() - ti) as f64 + 5.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{left}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{}</text>",
            COLORS[ti % COLORS.len()],
            left + 18.0,
            y + 10.0,
            escape(target)
        );
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg)
}
