//! An SVG picture of a [`QuorumAnalysis`] list: R(t) for each cluster size (with repair
//! solid, without dashed) and the nines of each.
//!
//! Written by hand: two panels of lines, bars and labels are a few dozen lines of SVG,
//! which does not justify a plotting library and its dependencies.

use std::fmt::Write;

use crate::analysis::QuorumAnalysis;
use crate::duration::format_hours;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 400.0;
const MARGIN: f64 = 60.0;
const PANEL_WIDTH: f64 = 380.0;
const PANEL_HEIGHT: f64 = 280.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Draws the analyses as a standalone SVG document.
pub fn quorum_svg(analyses: &[QuorumAnalysis], title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    reliability_panel(&mut svg, analyses);
    nines_panel(&mut svg, analyses);
    svg.push_str("</svg>\n");
    svg
}

fn reliability_panel(svg: &mut String, analyses: &[QuorumAnalysis]) {
    let (left, top) = (MARGIN, MARGIN);
    axes(svg, left, top, "R(t): P(quorum kept until t)");
    let mission = analyses
        .first()
        .and_then(|analysis| analysis.curve_hours.last().copied())
        .unwrap_or(1.0);
    for (tick, label) in [(0.0, "0".to_owned()), (1.0, format_hours(mission))] {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#,
            left + tick * PANEL_WIDTH,
            top + PANEL_HEIGHT + 16.0
        );
    }
    for (tick, label) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#,
            left - 6.0,
            top + (1.0 - tick) * PANEL_HEIGHT + 4.0
        );
    }
    for (index, analysis) in analyses.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let point = |hours: f64, reliability: f64| {
            format!(
                "{:.1},{:.1}",
                left + hours / mission * PANEL_WIDTH,
                top + (1.0 - reliability) * PANEL_HEIGHT
            )
        };
        for (curve, dash) in [
            (&analysis.curve_with_repair, ""),
            (&analysis.curve_without_repair, r#" stroke-dasharray="6 4""#),
        ] {
            if curve.is_empty() {
                continue;
            }
            let points: Vec<String> = analysis
                .curve_hours
                .iter()
                .zip(curve.iter())
                .map(|(&hours, &reliability)| point(hours, reliability))
                .collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
                points.join(" ")
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{colour}">{} members (solid: with repair, dashed: without)</text>"#,
            left + 8.0,
            top + PANEL_HEIGHT + 34.0 + 14.0 * index as f64,
            analysis.members
        );
    }
}

fn nines_panel(svg: &mut String, analyses: &[QuorumAnalysis]) {
    let (left, top) = (MARGIN * 2.0 + PANEL_WIDTH + 40.0, MARGIN);
    axes(svg, left, top, "steady-state availability (nines)");
    let finite_nines = |analysis: &QuorumAnalysis| {
        if analysis.nines.is_finite() {
            analysis.nines
        } else {
            16.0
        }
    };
    let most = analyses
        .iter()
        .map(finite_nines)
        .fold(1.0f64, f64::max)
        .ceil();
    let slot = PANEL_WIDTH / analyses.len().max(1) as f64;
    for (index, analysis) in analyses.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let height = finite_nines(analysis) / most * PANEL_HEIGHT;
        let x = left + slot * index as f64 + slot * 0.2;
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{height:.1}" fill="{colour}"/>"#,
            top + PANEL_HEIGHT - height,
            slot * 0.6
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:.2}</text>"#,
            x + slot * 0.3,
            top + PANEL_HEIGHT - height - 6.0,
            analysis.nines
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">n={} ({}/y down)</text>"#,
            x + slot * 0.3,
            top + PANEL_HEIGHT + 16.0,
            analysis.members,
            format_hours(analysis.downtime_hours_per_year)
        );
    }
}

fn axes(svg: &mut String, left: f64, top: f64, label: &str) {
    let _ = writeln!(
        svg,
        r#"<path d="M{left},{top} V{} H{}" fill="none" stroke="black"/>"#,
        top + PANEL_HEIGHT,
        left + PANEL_WIDTH
    );
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="{}">{}</text>"#,
        top - 8.0,
        escape(label)
    );
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{analyse_quorums, QuorumQuestion};
    use crate::component::Lifetime;

    #[test]
    fn draws_one_curve_pair_and_one_bar_per_option() {
        let analyses = analyse_quorums(&QuorumQuestion {
            members: vec![3, 5],
            lifetime: Lifetime::exponential_mttf(720.0).unwrap(),
            mean_time_to_repair_hours: 1.0,
            repair_crews: None,
            mission_hours: 720.0,
            monte_carlo: None,
        })
        .unwrap();
        let svg = quorum_svg(&analyses, "MTTF 30 d & MTTR 1 h");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(svg.contains("MTTF 30 d &amp; MTTR 1 h"));
    }
}
