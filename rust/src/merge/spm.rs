//! The pieces of a SentencePiece `tokenizer.model` (a protobuf `ModelProto`), for the GGUF export
//! of SentencePiece tokenizers (Llama 2, Mistral v0.1 and their fine-tunes).
//!
//! Only what llama.cpp's "llama" vocabulary needs is read: `ModelProto.pieces` (field 1, repeated
//! message), each `SentencePiece { piece: string = 1; score: float = 2; type: enum = 3 }` (type
//! defaults to NORMAL = 1). Every other field is skipped by its wire type. The file is untrusted:
//! each length is checked against what is left of its message before it is used, and a malformed
//! file is an error naming the file and the byte offset.

use std::path::Path;

use crate::error::{Error, Result};

/// One vocabulary entry: the piece, its score and its SentencePiece type (1 normal, 2 unknown,
/// 3 control, 4 user defined, 5 unused, 6 byte).
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: i32,
}

/// A cursor over protobuf bytes; `base` is the offset of `bytes` in the file (for errors).
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    base: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, what: &str) -> Error {
        Error::format(
            self.path,
            format!("byte {}", self.base + self.at),
            format!("not a SentencePiece model: {what}"),
        )
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| self.error("truncated varint"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| self.error("length runs past the end of its message"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    /// (field number, wire type) of the next field.
    fn key(&mut self) -> Result<(u64, u64)> {
        let key = self.varint()?;
        Ok((key >> 3, key & 7))
    }

    /// Skips a field's value of the given wire type.
    fn skip(&mut self, wire: u64) -> Result<()> {
        match wire {
            0 => self.varint().map(|_| ()),
            1 => self.take(8).map(|_| ()),
            2 => {
                let n = self.varint()? as usize;
                self.take(n).map(|_| ())
            }
            5 => self.take(4).map(|_| ()),
            _ => Err(self.error(&format!("unsupported wire type {wire}"))),
        }
    }

    /// The bytes of a length-delimited value, as a reader of their own.
    fn message(&mut self) -> Result<Reader<'a>> {
        let n = self.varint()? as usize;
        let base = self.base + self.at;
        let bytes = self.take(n)?;
        Ok(Reader {
            bytes,
            at: 0,
            base,
            path: self.path,
        })
    }
}

fn read_piece(mut r: Reader<'_>) -> Result<Piece> {
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: 1,
    };
    while !r.done() {
        match r.key()? {
            (1, 2) => {
                let n = r.varint()? as usize;
                let raw = r.take(n)?;
                piece.text = std::str::from_utf8(raw)
                    .map_err(|_| r.error("piece is not UTF-8"))?
                    .to_string();
            }
            (2, 5) => {
                let raw = r.take(4)?;
                piece.score = f32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
            }
            (3, 0) => {
                piece.kind = i32::try_from(r.varint()?)
                    .ok()
                    .filter(|k| (1..=6).contains(k))
                    .ok_or_else(|| r.error("piece type outside 1..=6"))?;
            }
            (_, wire) => r.skip(wire)?,
        }
    }
    Ok(piece)
}

/// The pieces of the SentencePiece model file at `path`, in id order.
pub fn read_pieces(path: &Path) -> Result<Vec<Piece>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_pieces(&bytes, path)
}

fn parse_pieces(bytes: &[u8], path: &Path) -> Result<Vec<Piece>> {
    let mut r = Reader {
        bytes,
        at: 0,
        base: 0,
        path,
    };
    let mut pieces = Vec::new();
    while !r.done() {
        match r.key()? {
            (1, 2) => pieces.push(read_piece(r.message()?)?),
            (_, wire) => r.skip(wire)?,
        }
    }
    if pieces.is_empty() {
        return Err(Error::format(
            path,
            "pieces",
            "not a SentencePiece model: no pieces",
        ));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn piece(text: &str, score: f32, kind: Option<u64>) -> Vec<u8> {
        let mut body = vec![0x0a];
        varint(text.len() as u64, &mut body);
        body.extend_from_slice(text.as_bytes());
        body.push(0x15);
        body.extend_from_slice(&score.to_le_bytes());
        if let Some(k) = kind {
            body.push(0x18);
            varint(k, &mut body);
        }
        let mut out = vec![0x0a];
        varint(body.len() as u64, &mut out);
        out.extend(body);
        out
    }

    #[test]
    fn reads_pieces_and_skips_other_fields() {
        let mut file = piece("<unk>", 0.0, Some(2));
        file.extend([0x12, 0x03, 0x08, 0x96, 0x01]); // trainer_spec { field 1: 150 }
        file.extend(piece("▁the", -1.5, None));
        file.extend(piece("<0x0A>", 0.0, Some(6)));
        let pieces = parse_pieces(&file, Path::new("m.model")).unwrap();
        assert_eq!(
            pieces,
            vec![
                Piece {
                    text: "<unk>".into(),
                    score: 0.0,
                    kind: 2
                },
                Piece {
                    text: "▁the".into(),
                    score: -1.5,
                    kind: 1
                },
                Piece {
                    text: "<0x0A>".into(),
                    score: 0.0,
                    kind: 6
                },
            ]
        );
    }

    #[test]
    fn malformed_files_are_errors_naming_the_offset() {
        let mut file = piece("abc", 1.0, Some(1));
        file.truncate(file.len() - 3);
        let err = parse_pieces(&file, Path::new("m.model"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("m.model") && err.contains("byte"), "{err}");
        let huge = [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(parse_pieces(&huge, Path::new("m.model")).is_err());
        assert!(parse_pieces(b"", Path::new("m.model")).is_err());
        let bad_type = piece("x", 0.0, Some(9));
        assert!(parse_pieces(&bad_type, Path::new("m.model")).is_err());
    }
}
