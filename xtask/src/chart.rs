//! The bench's chart: ns added per operation for each monitor, as a PNG.

use std::{fs, path::Path};

use anyhow::Result;

/// Grouped bars of ns added per operation (log scale), one group per workload.
pub fn chart(path: &Path, rows: &[(String, Vec<(&'static str, f64)>)]) -> Result<bool> {
    use plotters::prelude::*;
    let font = ["dejavu/DejaVuSans.ttf", "DejaVuSans.ttf"]
        .iter()
        .map(|f| Path::new("/usr/share/fonts/truetype").join(f))
        .find_map(|p| fs::read(p).ok());
    let Some(font) = font else {
        // plotters needs a font for any text; without one there is no readable chart.
        return Ok(false);
    };
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("font not usable"))?;
    let monitors: Vec<&str> = rows
        .first()
        .map(|(_, v)| v.iter().map(|(m, _)| *m).collect())
        .unwrap_or_default();
    let max = rows
        .iter()
        .flat_map(|(_, v)| v.iter().map(|(_, x)| *x))
        .filter(|x| x.is_finite())
        .fold(1000.0f64, f64::max);
    let root = BitMapBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = rows.len().max(1);
    let mut c = ChartBuilder::on(&root)
        .caption(
            "ns added per operation (median, log scale; lower is better)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups as f64, (50f64..max * 2.0).log_scale())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ns added")
        .draw()?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(150, 150, 150),
    ];
    let width = 0.8 / monitors.len().max(1) as f64;
    for (mi, m) in monitors.iter().enumerate() {
        let color = colors[mi % colors.len()];
        c.draw_series(rows.iter().enumerate().filter_map(|(gi, (_, v))| {
            let x = v.get(mi)?.1;
            if !x.is_finite() || x <= 50.0 {
                return None;
            }
            let x0 = gi as f64 + 0.1 + mi as f64 * width;
            Some(Rectangle::new(
                [(x0, 50.0), (x0 + width * 0.9, x)],
                color.filled(),
            ))
        }))?
        .label(*m)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    for (gi, (name, _)) in rows.iter().enumerate() {
        root.draw(&Text::new(
            name.clone(),
            (
                85 + ((gi as f64 + 0.2) * (1100.0 - 100.0) / groups as f64) as i32,
                530,
            ),
            ("sans-serif", 16),
        ))?;
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(true)
}
