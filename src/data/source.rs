//! Reading text sources as a stream of pieces: plain text files or folders, JSONL (`text`
//! field), Parquet (`text` column). A piece marks whether it ends a document, so the
//! tokenizer can put the end-of-text separator between documents only.

use anyhow::{anyhow, bail, Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// One chunk of text; `end_of_doc` is true on a document's last chunk.
pub struct Piece {
    pub text: String,
    pub end_of_doc: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
    Parquet,
    Shard,
}

/// Format from the config value, or from the file extension when "auto".
pub fn detect_format(path: &Path, configured: &str) -> Result<Format> {
    Ok(match configured {
        "text" => Format::Text,
        "jsonl" => Format::Jsonl,
        "parquet" => Format::Parquet,
        "shard" => Format::Shard,
        _ => {
            if path.is_dir() {
                Format::Text
            } else {
                match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
                    "jsonl" | "ndjson" => Format::Jsonl,
                    "parquet" => Format::Parquet,
                    "bin" | "u16" | "u32" => Format::Shard,
                    _ => Format::Text,
                }
            }
        }
    })
}

/// Files of a text folder, recursively, sorted (hidden files skipped).
fn text_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = std::fs::read_dir(&d)
            .with_context(|| format!("{}: cannot list folder", d.display()))?;
        for e in rd {
            let p = e?.path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

const CHUNK: usize = 1 << 16;

/// Stream a text file as pieces of about 64 KiB cut at line ends. Refuses binary files.
fn text_file(path: &Path, f: &mut dyn FnMut(Piece) -> Result<()>) -> Result<()> {
    let name = path.display();
    let mut r = BufReader::with_capacity(
        1 << 20,
        File::open(path).with_context(|| format!("{name}: cannot open"))?,
    );
    let mut buf = String::new();
    let mut line = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .with_context(|| format!("{name}: read error"))?;
        if n == 0 {
            break;
        }
        if first && (line.contains(&0) || std::str::from_utf8(&line).is_err()) {
            bail!("{name}: looks like a binary file, not UTF-8 text; fix: give a text file, or set data.format = \"shard\" for token files");
        }
        first = false;
        let s = std::str::from_utf8(&line)
            .map_err(|e| anyhow!("{name}: invalid UTF-8 ({e}); fix: convert the file to UTF-8"))?;
        if s.contains('\0') {
            bail!("{name}: contains NUL bytes, so it is not text; fix: give a text file or set data.format = \"shard\"");
        }
        buf.push_str(s);
        if buf.len() >= CHUNK {
            f(Piece {
                text: std::mem::take(&mut buf),
                end_of_doc: false,
            })?;
        }
    }
    f(Piece {
        text: buf,
        end_of_doc: true,
    })
}

fn jsonl_file(path: &Path, f: &mut dyn FnMut(Piece) -> Result<()>) -> Result<()> {
    let name = path.display();
    let r = BufReader::new(File::open(path).with_context(|| format!("{name}: cannot open"))?);
    for (i, line) in r.lines().enumerate() {
        let line = line.with_context(|| format!("{name}: line {}: not UTF-8 text", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| {
            format!(
                "{name}: line {}: not valid JSON; fix: one JSON object per line",
                i + 1
            )
        })?;
        let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
            anyhow!("{name}: line {}: no string field \"text\"; fix: each line needs {{\"text\": \"...\"}}", i + 1)
        })?;
        f(Piece {
            text: text.to_string(),
            end_of_doc: true,
        })?;
    }
    Ok(())
}

fn parquet_file(path: &Path, f: &mut dyn FnMut(Piece) -> Result<()>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let name = path.display();
    let file = File::open(path).with_context(|| format!("{name}: cannot open"))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| anyhow!("{name}: not a readable Parquet file ({e})"))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    // top-level columns by name (a list column's leaves are called "element", which would
    // name nothing the user wrote)
    let top = schema.root_schema().get_fields();
    match top.iter().find(|t| t.name() == "text") {
        None => {
            let cols: Vec<&str> = top.iter().map(|c| c.name()).collect();
            bail!("{name}: no column named \"text\" (columns: {}); fix: rename the text column to \"text\"", cols.join(", "));
        }
        Some(t) if t.is_group() => bail!(
            "{name}: column \"text\" is a list or struct, not one string per row; fix: write one \
             document per row (in pandas: df.explode(\"text\"), or join the pieces into one string)"
        ),
        Some(_) => {}
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{name}: {e}"))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow!("{name}: row {i}: {e}"))?;
        for (col, field) in row.get_column_iter() {
            if col == "text" {
                match field {
                    Field::Str(s) => f(Piece {
                        text: s.clone(),
                        end_of_doc: true,
                    })?,
                    Field::Null => {}
                    other => {
                        bail!("{name}: row {i}: column \"text\" holds {}, not a string; fix: one string per row", other.to_string().chars().take(60).collect::<String>())
                    }
                }
            }
        }
    }
    Ok(())
}

/// Call `f` on every piece of the source at `path`, in a fixed order.
pub fn for_each_piece(
    path: &Path,
    format: Format,
    f: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let files = if path.is_dir() {
        let v = text_files(path)?;
        if v.is_empty() {
            bail!(
                "{}: folder has no files; fix: point data.path at text files",
                path.display()
            );
        }
        v
    } else if path.exists() {
        vec![path.to_path_buf()]
    } else {
        bail!(
            "{}: no such file or folder; fix: check data.path / --data",
            path.display()
        );
    };
    for p in files {
        match format {
            Format::Text => text_file(&p, f)?,
            Format::Jsonl => jsonl_file(&p, f)?,
            Format::Parquet => parquet_file(&p, f)?,
            Format::Shard => bail!("{}: a token shard has no text to read", p.display()),
        }
    }
    Ok(())
}

/// Total bytes and latest modification time of a source (for the token cache key).
pub fn fingerprint(path: &Path) -> Result<(u64, u64)> {
    let files = if path.is_dir() {
        text_files(path)?
    } else {
        vec![path.to_path_buf()]
    };
    let (mut size, mut mtime) = (0u64, 0u64);
    for p in files {
        let m = std::fs::metadata(&p).with_context(|| format!("{}: cannot stat", p.display()))?;
        size += m.len();
        let t = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        mtime = mtime.max(t.map(|d| d.as_secs()).unwrap_or(0));
    }
    Ok((size, mtime))
}

/// Read up to `limit` bytes of whole files/records (for tokenizer training samples).
pub fn sample_text(path: &Path, format: Format, limit: usize) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let stop = "sample limit reached";
    let r = for_each_piece(path, format, &mut |p| {
        total += p.text.len();
        out.push(p.text);
        if total >= limit {
            bail!(stop);
        }
        Ok(())
    });
    match r {
        Err(e) if e.to_string() == stop => {}
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    if total == 0 {
        bail!(
            "{}: contains no text; fix: give a non-empty data file",
            path.display()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(path: &Path, format: Format) -> Result<Vec<(String, bool)>> {
        let mut v = Vec::new();
        for_each_piece(path, format, &mut |p| {
            v.push((p.text, p.end_of_doc));
            Ok(())
        })?;
        Ok(v)
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keel-src-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn parquet_text_column() {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;
        let d = tmp("pq");
        let path = d.join("docs.parquet");
        let schema = Arc::new(
            parse_message_type("message s { REQUIRED INT32 id; REQUIRED BYTE_ARRAY text (UTF8); }")
                .unwrap(),
        );
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build(),
        );
        let mut w = SerializedFileWriter::new(File::create(&path).unwrap(), schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int32Type>()
            .write_batch(&[1, 2, 3], None, None)
            .unwrap();
        col.close().unwrap();
        let texts: Vec<ByteArray> = ["first doc", "second", "third ünïcode"]
            .iter()
            .map(|s| ByteArray::from(*s))
            .collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&texts, None, None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();
        assert_eq!(detect_format(&path, "auto").unwrap(), Format::Parquet);
        let v = collect(&path, Format::Parquet).unwrap();
        assert_eq!(
            v,
            vec![
                ("first doc".into(), true),
                ("second".into(), true),
                ("third ünïcode".into(), true)
            ]
        );
        // a list column named "text": named as such, with the fix (not "no column named text
        // (columns: element)")
        let lp = d.join("list.parquet");
        let schema = Arc::new(
            parse_message_type(
                "message s { OPTIONAL group text (LIST) { REPEATED group list { OPTIONAL BYTE_ARRAY element (UTF8); } } }",
            )
            .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().build());
        let w = SerializedFileWriter::new(File::create(&lp).unwrap(), schema, props).unwrap();
        w.close().unwrap();
        let e = collect(&lp, Format::Parquet).unwrap_err().to_string();
        assert!(e.contains("is a list") && e.contains("explode"), "{e}");
        // not parquet at all
        std::fs::write(d.join("fake.parquet"), b"hello").unwrap();
        assert!(collect(&d.join("fake.parquet"), Format::Parquet)
            .unwrap_err()
            .to_string()
            .contains("fake.parquet"));
    }

    #[test]
    fn jsonl_and_folders() {
        let d = tmp("jl");
        let p = d.join("a.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"meta\": 1}\n",
        )
        .unwrap();
        assert_eq!(
            collect(&p, Format::Jsonl).unwrap(),
            vec![("one".into(), true), ("two".into(), true)]
        );
        std::fs::write(&p, "{\"text\": \"one\"}\n{\"body\": 3}\n").unwrap();
        let e = collect(&p, Format::Jsonl).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("\"text\""), "{e}");
        std::fs::write(&p, "{not json\n").unwrap();
        assert!(collect(&p, Format::Jsonl)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        // folder: files in sorted order, each one document; hidden files skipped
        let f = d.join("corpus");
        std::fs::create_dir_all(f.join("sub")).unwrap();
        std::fs::write(f.join("b.txt"), "bee\n").unwrap();
        std::fs::write(f.join("a.txt"), "ay\n").unwrap();
        std::fs::write(f.join("sub/c.txt"), "sea\n").unwrap();
        std::fs::write(f.join(".hidden"), "no\n").unwrap();
        let v = collect(&f, Format::Text).unwrap();
        assert_eq!(
            v,
            vec![
                ("ay\n".into(), true),
                ("bee\n".into(), true),
                ("sea\n".into(), true)
            ]
        );
        // large text is cut into pieces at line ends; only the last ends the document
        let big: String = (0..20000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(d.join("big.txt"), &big).unwrap();
        let v = collect(&d.join("big.txt"), Format::Text).unwrap();
        assert!(v.len() > 1 && v.last().unwrap().1 && v.iter().rev().skip(1).all(|p| !p.1));
        assert_eq!(v.iter().map(|p| p.0.as_str()).collect::<String>(), big);
    }
}
