//! Streaming chunked transfer-coding: strict decode, normalized re-encode.
//!
//! The decoder checks every chunk-size line (hex digits only, no overflow, CRLF only), drops
//! chunk extensions and trailers, and writes a normalized chunked stream to the output, so the
//! upstream sees exactly the framing weft validated. It never buffers more than the input slice.

/// The longest chunk-size line weft accepts, extensions included (bytes).
const MAX_SIZE_LINE: usize = 4096;
/// The most trailer bytes weft reads (and discards) after the last chunk.
const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("invalid chunk size")]
    BadSize,
    #[error("chunk size too large")]
    SizeOverflow,
    #[error("chunk line too long")]
    LineTooLong,
    #[error("missing CRLF after chunk")]
    BadDelimiter,
    #[error("trailer section too large")]
    TrailerTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a size line.
    Size {
        value: u64,
        digits: u8,
        line: usize,
    },
    /// In an extension, after `;`, until CR.
    Ext {
        value: u64,
        line: usize,
    },
    /// Saw CR at the end of a size line.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (or the final CRLF).
    TrailerStart {
        total: usize,
    },
    TrailerLine {
        total: usize,
    },
    TrailerLf {
        total: usize,
        empty: bool,
    },
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
                line: 0,
            },
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes from `input`, appending normalized chunked encoding to `out`.
    /// Returns how many input bytes were consumed; stops at the end of the body.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkedError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Size {
                    value,
                    digits,
                    line,
                } => {
                    if line >= MAX_SIZE_LINE {
                        return Err(ChunkedError::LineTooLong);
                    }
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            if digits >= 16 {
                                return Err(ChunkedError::SizeOverflow);
                            }
                            let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                            State::Size {
                                value: value << 4 | d,
                                digits: digits + 1,
                                line: line + 1,
                            }
                        }
                        b';' if digits > 0 => State::Ext {
                            value,
                            line: line + 1,
                        },
                        b'\r' if digits > 0 => State::SizeLf { value },
                        _ => return Err(ChunkedError::BadSize),
                    }
                }
                State::Ext { value, line } => {
                    if line >= MAX_SIZE_LINE {
                        return Err(ChunkedError::LineTooLong);
                    }
                    match b {
                        b'\r' => State::SizeLf { value },
                        b'\t' => State::Ext {
                            value,
                            line: line + 1,
                        },
                        b'\n' | 0..=0x1f | 0x7f => return Err(ChunkedError::BadSize),
                        _ => State::Ext {
                            value,
                            line: line + 1,
                        },
                    }
                }
                State::SizeLf { value } => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadSize);
                    }
                    if value == 0 {
                        State::TrailerStart { total: 0 }
                    } else {
                        out.extend_from_slice(format!("{value:x}\r\n").as_bytes());
                        State::Data { remaining: value }
                    }
                }
                State::Data { remaining } => {
                    let avail = (input.len() - i) as u64;
                    let take = remaining.min(avail) as usize;
                    out.extend_from_slice(&input[i..i + take]);
                    i += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining: left }
                    };
                    continue;
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    State::DataLf
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    out.extend_from_slice(b"\r\n");
                    State::Size {
                        value: 0,
                        digits: 0,
                        line: 0,
                    }
                }
                State::TrailerStart { total } => match b {
                    b'\r' => State::TrailerLf {
                        total: total + 1,
                        empty: true,
                    },
                    b'\n' => return Err(ChunkedError::BadDelimiter),
                    _ => State::TrailerLine { total: total + 1 },
                },
                State::TrailerLine { total } => {
                    if total >= MAX_TRAILER_BYTES {
                        return Err(ChunkedError::TrailerTooLarge);
                    }
                    match b {
                        b'\r' => State::TrailerLf {
                            total: total + 1,
                            empty: false,
                        },
                        b'\n' | 0 => return Err(ChunkedError::BadDelimiter),
                        _ => State::TrailerLine { total: total + 1 },
                    }
                }
                State::TrailerLf { total, empty } => {
                    if b != b'\n' {
                        return Err(ChunkedError::BadDelimiter);
                    }
                    if empty {
                        out.extend_from_slice(b"0\r\n\r\n");
                        i += 1;
                        self.state = State::Done;
                        return Ok(i);
                    }
                    State::TrailerStart { total: total + 1 }
                }
            };
            i += 1;
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, usize, bool), ChunkedError> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut used = 0;
        for piece in input.chunks(step) {
            let n = d.decode(piece, &mut out)?;
            used += n;
            if d.is_done() {
                break;
            }
        }
        Ok((out, used, d.is_done()))
    }

    #[test]
    fn decodes_in_any_split() {
        let input = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for step in 1..input.len() {
            let (out, used, done) = decode_all(input, step).expect("valid");
            assert!(done);
            assert_eq!(used, input.len() - 4, "step {step}");
            // data survives; extensions and trailers are dropped; chunk lines are normalized
            let body: Vec<u8> = out.clone();
            let text = String::from_utf8(body).expect("utf8");
            assert!(text.ends_with("0\r\n\r\n"), "{text:?}");
            assert!(!text.contains("name=value") && !text.contains("X-Trailer"));
            let data: String = text
                .split("\r\n")
                .filter(|l| !l.chars().all(|c| c.is_ascii_hexdigit()))
                .collect();
            assert_eq!(data, "hello world");
        }
    }

    #[test]
    fn bad_framing_is_an_error() {
        let cases: [&[u8]; 9] = [
            b"x\r\n",
            b"\r\n",
            b"-5\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXY0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5 \r\nhello\r\n",
            b"0\r\n\n",
            b"3;ext\nabc",
        ];
        for c in cases {
            assert!(
                decode_all(c, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(c)
            );
            assert!(
                decode_all(c, c.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(c)
            );
        }
    }
}
