//! Any bytes as a token shard (llm.c header or raw u16/u32): an error or a readable file whose
//! every read stays in bounds.
#![no_main]
use keel::data::shard::{Layout, TokenDtype, TokenFile};
use libfuzzer_sys::fuzz_target;
mod common;

fuzz_target!(|data: &[u8]| {
    let p = common::scratch("tokens.bin", data);
    for layout in [
        Layout::Auto,
        Layout::Raw(TokenDtype::U16),
        Layout::Raw(TokenDtype::U32),
    ] {
        if let Ok(tf) = TokenFile::open(&p, layout, Some(256)) {
            let n = tf.len.min(64);
            let mut out = vec![0u32; n];
            tf.read(tf.len - n, &mut out);
            let _ = tf.check_vocab(256);
        }
    }
});
