//! The HTML page: header with status and key numbers, sections of inline-SVG figures and
//! tables. One file, inline CSS, no scripts, nothing fetched from the network.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `<table>` from already-escaped cells.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<div class=tablewrap><table><thead><tr>");
    for h in headers {
        s.push_str(&format!("<th>{}</th>", esc(h)));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            s.push_str(&format!("<td>{c}</td>"));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></div>");
    s
}

/// The SVG at `base.svg`, inline, with a caption and links to the SVG/PNG files.
pub fn figure(base: &Path, id: &str, caption: &str) -> Result<String> {
    let svg_path = PathBuf::from(format!("{}.svg", base.display()));
    let svg = std::fs::read_to_string(&svg_path)
        .with_context(|| format!("{}: cannot read", svg_path.display()))?;
    let svg = svg.trim_start_matches(|c: char| c != '<');
    let svg = svg.replacen(
        "<svg ",
        &format!("<svg role=\"img\" aria-label=\"{}\" ", esc(caption)),
        1,
    );
    let file = base
        .file_name()
        .map_or(String::new(), |f| f.to_string_lossy().to_string());
    let rel = base
        .parent()
        .and_then(|p| p.file_name())
        .map_or(String::new(), |p| format!("{}/", p.to_string_lossy()));
    let rel = if rel == "plots/" { rel } else { String::new() };
    Ok(format!(
        "<figure class=plot id=\"fig-{}\">{svg}<figcaption>{} <span class=files><a href=\"{rel}{f}.svg\">SVG</a> · <a href=\"{rel}{f}.png\">PNG</a></span></figcaption></figure>",
        esc(id),
        esc(caption),
        f = esc(&file)
    ))
}

pub struct Page {
    pub title: String,
    pub subtitle: String,
    /// (text, class: good | warn | bad)
    pub status: Option<(String, String)>,
    stats: Vec<(String, String)>,
    sections: Vec<(String, String, String)>,
}

const CSS: &str = r#"
:root{--ink:#1d2430;--muted:#667085;--line:#e4e7ec;--bg:#f6f7f9;--card:#fff;--good:#157f3b;--warn:#b54708;--bad:#b42318}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{background:#101828;color:#fff;padding:28px 40px 22px}
header h1{margin:0;font-size:24px;font-weight:650;letter-spacing:.2px}
header .sub{color:#c7cdd6;margin-top:6px;font-size:14px}
.pill{display:inline-block;padding:1px 10px;border-radius:999px;font-size:12.5px;font-weight:650;vertical-align:middle;margin-left:10px;color:#fff}
.pill.good{background:var(--good)}.pill.warn{background:var(--warn)}.pill.bad{background:var(--bad)}
main{max-width:1400px;margin:0 auto;padding:20px 32px 60px}
.stats{display:flex;flex-wrap:wrap;gap:12px;margin:-38px 0 8px}
.stat{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 16px;min-width:140px;box-shadow:0 1px 2px rgba(16,24,40,.06)}
.stat .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.4px}
.stat .v{font-size:19px;font-weight:650;font-variant-numeric:tabular-nums}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 22px;margin-top:22px}
section h2{margin:0 0 12px;font-size:18px}
h3{font-size:15px;margin:16px 0 8px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:16px}
.grid1{display:grid;grid-template-columns:1fr;gap:16px}
figure.plot{margin:0;border:1px solid var(--line);border-radius:8px;padding:6px;background:#fff}
figure.plot svg{width:100%;height:auto;display:block}
figcaption{font-size:13px;color:var(--muted);padding:4px 6px 2px}
.files{float:right}.files a{color:var(--muted)}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13.5px;font-variant-numeric:tabular-nums}
th{text-align:left;font-weight:600;color:var(--muted);border-bottom:2px solid var(--line);padding:6px 10px;white-space:nowrap}
td{border-bottom:1px solid var(--line);padding:6px 10px;vertical-align:top}
tbody tr:nth-child(even){background:#fafbfc}
.kind{font-weight:600}.k-spike,.k-diverged,.k-divergence,.k-give_up,.k-failed{color:var(--bad)}.k-skip,.k-lr_backoff,.k-warning,.k-incomplete{color:var(--warn)}.k-finished,.k-resume{color:var(--good)}
pre{background:#0f1720;color:#e6edf3;padding:14px 16px;border-radius:8px;overflow:auto;font-size:12.5px;line-height:1.45}
ul.findings{margin:0;padding-left:20px}ul.findings li{margin:6px 0}
.muted{color:var(--muted)}
details summary{cursor:pointer;color:var(--muted);margin:10px 0}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:28px}
"#;

impl Page {
    pub fn new(title: &str) -> Page {
        Page {
            title: title.into(),
            subtitle: String::new(),
            status: None,
            stats: Vec::new(),
            sections: Vec::new(),
        }
    }

    pub fn stat(&mut self, k: &str, v: &str) {
        self.stats.push((k.into(), v.into()));
    }

    /// A section; `body` is HTML.
    pub fn section(&mut self, id: &str, title: &str, body: String) {
        self.sections.push((id.into(), title.into(), body));
    }

    pub fn render(&self) -> String {
        let mut s = String::from("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>");
        s.push_str("<meta name=viewport content=\"width=device-width,initial-scale=1\">");
        s.push_str(&format!(
            "<title>{}</title><style>{CSS}</style></head><body>",
            esc(&self.title)
        ));
        s.push_str(&format!("<header><h1>{}", esc(&self.title)));
        if let Some((t, c)) = &self.status {
            s.push_str(&format!(
                " <span class=\"pill {}\" id=status>{}</span>",
                esc(c),
                esc(t)
            ));
        }
        s.push_str("</h1>");
        if !self.subtitle.is_empty() {
            s.push_str(&format!("<div class=sub>{}</div>", esc(&self.subtitle)));
        }
        s.push_str("<div style=\"height:34px\"></div></header><main>");
        if !self.stats.is_empty() {
            s.push_str("<div class=stats>");
            for (k, v) in &self.stats {
                s.push_str(&format!(
                    "<div class=stat><div class=k>{}</div><div class=v>{}</div></div>",
                    esc(k),
                    esc(v)
                ));
            }
            s.push_str("</div>");
        }
        for (id, title, body) in &self.sections {
            s.push_str(&format!(
                "<section id=\"{}\"><h2>{}</h2>{body}</section>",
                esc(id),
                esc(title)
            ));
        }
        s.push_str(&format!(
            "<footer>keel {} · written {} · self-contained: opens offline</footer></main></body></html>\n",
            env!("CARGO_PKG_VERSION"),
            esc(&now_utc())
        ));
        s
    }
}

/// "2026-11-29 14:03 UTC" without a date crate.
fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // civil from days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_date() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let d = now_utc();
        assert!(
            d.starts_with("20") && d.ends_with("UTC") && d.len() == 20,
            "{d}"
        );
    }
}
