//! Result rows of the benchmark: the printed table, CSV and JSON.

use std::fmt::Write as _;
use std::time::Duration;

use lightning_attention::{DType, StageTimes};

/// One measured (or skipped) configuration.
pub struct Row {
    pub target: String,
    /// `copy`, `decode`, `prefill`, or `prefill BLOCK/CBLOCK` for a non-default config.
    pub op: String,
    /// (b, h, n, d) with e = d; n = 1 for decode.
    pub shape: [usize; 4],
    pub dtype: String,
    pub time: Option<Duration>,
    pub tokens_per_s: Option<f64>,
    pub io_floor_fraction: Option<f64>,
    pub state_tb_s: Option<f64>,
    pub copy_tb_s: Option<f64>,
    /// Prefill only: each kernel timed alone.
    pub stages: Option<StageTimes>,
    pub note: String,
}

impl Row {
    pub fn new(target: &str, op: &'static str, shape: [usize; 4], dtype: DType) -> Self {
        Self {
            target: target.into(),
            op: op.into(),
            shape,
            dtype: dtype.to_string(),
            time: None,
            tokens_per_s: None,
            io_floor_fraction: None,
            state_tb_s: None,
            copy_tb_s: None,
            stages: None,
            note: String::new(),
        }
    }

    pub fn copy(target: &str, bandwidth: f64) -> Self {
        let mut row = Self::new(target, "copy", [0; 4], DType::F32);
        row.copy_tb_s = Some(bandwidth / 1e12);
        row
    }

    /// Records a median `time` for `tokens` tokens moving at least `bytes`, on a device copying `bandwidth` B/s.
    pub fn measured(&mut self, time: Duration, tokens: usize, bytes: f64, bandwidth: f64) {
        self.time = Some(time);
        self.tokens_per_s = Some(tokens as f64 / time.as_secs_f64());
        self.io_floor_fraction = Some(bytes / bandwidth / time.as_secs_f64());
    }

    pub fn shape_label(&self) -> String {
        let [b, h, n, d] = self.shape;
        format!("({b},{h},{n},{d})")
    }

    /// "diag / kv-parallel / kv-reduce / non-diag" in ms, "diag / chunk
    /// state / non-diag" where the chunk-recurrent routine ran, or "fused"
    /// where the fused routine ran, with the bf16
    /// conversions where the runtime has no bf16.
    pub fn stages_label(&self) -> String {
        self.stages
            .map(|s| {
                let kernels = if !s.fused.is_zero() {
                    format!("fused {:.2}", ms(s.fused))
                } else if s.chunk_state.is_zero() {
                    format!(
                        "{:.2} / {:.2} / {:.2} / {:.2}",
                        ms(s.diag),
                        ms(s.kv_parallel),
                        ms(s.kv_reduce),
                        ms(s.non_diag)
                    )
                } else {
                    format!(
                        "{:.2} / chunk {:.2} / {:.2}",
                        ms(s.diag),
                        ms(s.chunk_state),
                        ms(s.non_diag)
                    )
                };
                if s.widening.is_zero() {
                    kernels
                } else {
                    format!("{kernels} + widening {:.2}", ms(s.widening))
                }
            })
            .unwrap_or("-".into())
    }

    pub fn line(&self) -> String {
        let opt = |x: Option<f64>, unit: &str| x.map(|v| format!("{v:.3}{unit}")).unwrap_or("-".into());
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.target,
            self.op,
            if self.op == "copy" {
                "-".into()
            } else {
                self.shape_label()
            },
            self.dtype,
            opt(self.time.map(|t| t.as_secs_f64() * 1e3), " ms"),
            self.tokens_per_s
                .map(|t| format!("{:.3e}", t))
                .unwrap_or("-".into()),
            opt(self.io_floor_fraction.map(|f| f * 100.0), "%"),
            opt(self.state_tb_s.or(self.copy_tb_s), " TB/s"),
            self.stages_label(),
            self.note,
        )
    }
}

/// The markdown table of all rows.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| target | op | (b,h,n,d) | dtype | time | tokens/s | of IO floor | TB/s (state or copy) | diag / kv-par / kv-red / non-diag ms | note |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(s, "{}", row.line());
    }
    s
}

/// Writes `bench.csv` and `bench.json` under `dir`.
pub fn write(rows: &[Row], dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let num = |x: Option<f64>| x.map(|v| format!("{v}")).unwrap_or_default();
    let json_num = |x: Option<f64>| x.map(|v| format!("{v}")).unwrap_or("null".into());
    let mut csv =
        String::from("target,op,b,h,n,d,dtype,time_ms,tokens_per_s,io_floor_fraction,tb_s,stages_ms,note\n");
    let mut json = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let [b, h, n, d] = r.shape;
        let ms = r.time.map(|t| t.as_secs_f64() * 1e3);
        let tb = r.state_tb_s.or(r.copy_tb_s);
        let _ = writeln!(
            csv,
            "{},{},{b},{h},{n},{d},{},{},{},{},{},{},\"{}\"",
            r.target,
            r.op,
            r.dtype,
            num(ms),
            num(r.tokens_per_s),
            num(r.io_floor_fraction),
            num(tb),
            r.stages_label(),
            r.note.replace('"', "'")
        );
        let _ = writeln!(
            json,
            "  {{\"target\": \"{}\", \"op\": \"{}\", \"shape\": [{b}, {h}, {n}, {d}], \"dtype\": \"{}\", \"time_ms\": {}, \"tokens_per_s\": {}, \"io_floor_fraction\": {}, \"tb_s\": {}, \"stages_ms\": \"{}\", \"note\": \"{}\"}}{}",
            r.target,
            r.op,
            r.dtype,
            json_num(ms),
            json_num(r.tokens_per_s),
            json_num(r.io_floor_fraction),
            json_num(tb),
            r.stages_label(),
            r.note.replace('"', "'"),
            if i + 1 < rows.len() { "," } else { "" }
        );
    }
    json.push_str("]\n");
    std::fs::write(dir.join("bench.csv"), csv)?;
    std::fs::write(dir.join("bench.json"), json)
}

/// `d` in milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
