//! A run's outputs: `metrics.csv`, `curves.png` and `report.json`.

use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::train::RunReport;
use crate::error::AdapterError;
use crate::store::st::write_atomic;

/// One training step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogRow {
    /// Step, 1-based.
    pub step: usize,
    /// Epoch, 1-based.
    pub epoch: usize,
    /// Learning rate used.
    pub lr: f64,
    /// Batch loss.
    pub loss: f64,
    /// Batch accuracy.
    pub accuracy: f64,
}

/// One dev evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRow {
    /// Epoch, 1-based.
    pub epoch: usize,
    /// Steps done.
    pub step: usize,
    /// Mean training loss since the previous evaluation.
    pub train_loss: f64,
    /// Training accuracy since the previous evaluation.
    pub train_acc: f64,
    /// Dev accuracy.
    pub dev_acc: f64,
    /// Seconds of training so far (evaluation excluded).
    pub train_seconds: f64,
}

/// Writes `metrics.csv` (one row per step, dev accuracy on the steps it was measured),
/// `report.json` and `curves.png` (training loss and dev accuracy).
pub fn write_outputs(dir: &Path, report: &RunReport) -> Result<(), AdapterError> {
    let mut csv = String::from("step,epoch,lr,loss,batch_accuracy,dev_accuracy\n");
    for row in &report.history {
        let dev = report
            .evals
            .iter()
            .find(|e| e.step == row.step)
            .map(|e| format!("{:.6}", e.dev_acc))
            .unwrap_or_default();
        csv += &format!(
            "{},{},{:.6e},{:.6},{:.4},{dev}\n",
            row.step, row.epoch, row.lr, row.loss, row.accuracy
        );
    }
    write_atomic(&dir.join("metrics.csv"), csv.as_bytes())?;
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| AdapterError::format("report.json", e.to_string()))?;
    write_atomic(&dir.join("report.json"), &json)?;
    // plotters writes the file itself: drawn under a temporary name and renamed into place,
    // as every other output, so a failure leaves no partial PNG.
    let png = dir.join("curves.png");
    let tmp = dir.join(format!(".curves.png.tmp-{}.png", std::process::id()));
    let drawn = plot_curves(&tmp, report)
        .map_err(|e| std::io::Error::other(format!("drawing the plot: {e}")))
        .and_then(|_| std::fs::rename(&tmp, &png));
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(AdapterError::io(&png, e));
    }
    Ok(())
}

/// The plot's font, shipped with the crate (DejaVu Sans, ASCII and a few symbols; its license
/// is in `assets/fonts/`), so the plot never depends on fonts installed on the machine.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
                .map_err(|_| "the shipped font does not load".to_string())
        })
        .clone()
}

/// Draws the training loss (per step, and its moving average) and the dev accuracy (per
/// evaluation) into a PNG.
pub fn plot_curves(path: &Path, report: &RunReport) -> Result<(), Box<dyn std::error::Error>> {
    register_font()?;
    let root = BitMapBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let steps = report.history.len().max(1) as f64;
    let max_loss = report
        .history
        .iter()
        .map(|r| r.loss)
        .fold(0.0, f64::max)
        .max(1e-3);
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..steps, 0f64..max_loss * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy")
        .draw()?;
    chart.draw_series(LineSeries::new(
        report.history.iter().map(|r| (r.step as f64, r.loss)),
        RGBColor(180, 200, 230),
    ))?;
    let window = 25usize;
    let smooth: Vec<(f64, f64)> = (0..report.history.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let w = &report.history[lo..=i];
            (
                report.history[i].step as f64,
                w.iter().map(|r| r.loss).sum::<f64>() / w.len() as f64,
            )
        })
        .collect();
    chart
        .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))?
        .label(format!("moving average ({window} steps)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;

    let lo = report.evals.iter().map(|e| e.dev_acc).fold(1.0, f64::min);
    let hi = report.evals.iter().map(|e| e.dev_acc).fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption(
            format!("dev accuracy (test {:.2}%)", 100.0 * report.test_acc),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..steps, (lo - 0.02).max(0.0)..(hi + 0.02).min(1.0))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("accuracy")
        .draw()?;
    let points: Vec<(f64, f64)> = report
        .evals
        .iter()
        .map(|e| (e.step as f64, e.dev_acc))
        .collect();
    chart.draw_series(LineSeries::new(points.clone(), RED.stroke_width(2)))?;
    chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, RED.filled())))?;
    root.present()?;
    Ok(())
}
