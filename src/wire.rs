//! The protobuf wire format, read and rewritten without decoding: top-level string fields, the
//! fields of embedded messages, repeated scalars packed or not.
//!
//! The data plane names a model from requests whose full message types it need not know (Triton's
//! `ModelConfigRequest`, `RepositoryModelLoadRequest`…), and writes the backend's model name and
//! version into requests on their way upstream. Doing both on the wire format, field by field,
//! keeps every other field byte for byte — including fields modelgate's protos do not declare,
//! which decoding and re-encoding with prost would drop — and costs a scan, not a decode. The
//! record writer reads OIP tensors' values (`crate::oip`) and the store its feature values the
//! same way. A leaf: it knows protobuf's encoding, not any message.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a message could not be scanned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A varint or a length runs past the end, or a wire type is invalid.
    #[error("malformed protobuf message at byte {0}")]
    Malformed(usize),
    /// The field holds bytes that are not UTF-8.
    #[error("field {0} is not a UTF-8 string")]
    NotUtf8(u32),
    /// The field is not encoded as its type is (a string or a message not length-delimited).
    #[error("field {0} has the wrong wire type")]
    WrongType(u32),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let start = *pos;
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(WireError::Malformed(start))?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(WireError::Malformed(start))
}

/// Calls `each` with every varint of a packed repeated integer field's payload, in order (an
/// `int64`'s negative values are ten-byte two's complement varints: `v as i64`).
pub fn varints(packed: &[u8], mut each: impl FnMut(u64)) -> Result<(), WireError> {
    let mut pos = 0;
    while pos < packed.len() {
        each(varint(packed, &mut pos)?);
    }
    Ok(())
}

/// One top-level field: its number, and the byte range of the whole field (key included) and of
/// a length-delimited payload.
pub(crate) struct Field {
    pub(crate) number: u32,
    pub(crate) whole: std::ops::Range<usize>,
    pub(crate) payload: Option<std::ops::Range<usize>>,
    /// A varint field's value.
    pub(crate) varint: Option<u64>,
    /// A fixed-width field's bytes (4 or 8, little-endian).
    pub(crate) fixed: Option<std::ops::Range<usize>>,
}

/// Every field of `msg` in order, by byte range; a malformed message ends with one error.
pub(crate) fn fields(msg: &[u8]) -> impl Iterator<Item = Result<Field, WireError>> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= msg.len() {
            return None;
        }
        let start = pos;
        let parsed = (|| {
            let key = varint(msg, &mut pos)?;
            let number = u32::try_from(key >> 3).map_err(|_| WireError::Malformed(start))?;
            let (mut payload, mut value, mut fixed) = (None, None, None);
            match key & 7 {
                0 => value = Some(varint(msg, &mut pos)?),
                1 => {
                    fixed = Some(pos..pos + 8);
                    pos += 8;
                }
                2 => {
                    let len = usize::try_from(varint(msg, &mut pos)?)
                        .map_err(|_| WireError::Malformed(start))?;
                    let end = pos.checked_add(len).ok_or(WireError::Malformed(start))?;
                    payload = Some(pos..end);
                    pos = end;
                }
                5 => {
                    fixed = Some(pos..pos + 4);
                    pos += 4;
                }
                // Groups (3, 4) are not proto3; 6 and 7 are not wire types.
                _ => return Err(WireError::Malformed(start)),
            }
            if pos > msg.len() || number == 0 {
                return Err(WireError::Malformed(start));
            }
            Ok(Field {
                number,
                whole: start..pos,
                payload,
                varint: value,
                fixed,
            })
        })();
        if parsed.is_err() {
            pos = msg.len();
        }
        Some(parsed)
    })
}

/// How the elements of a repeated scalar field are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    /// Varints (`bool`, `int32`, `int64`, `uint32`, `uint64`).
    Varint,
    /// Four little-endian bytes (`float`, `fixed32`).
    Fixed32,
    /// Eight little-endian bytes (`double`, `fixed64`).
    Fixed64,
}

/// Calls `each` with every element of repeated scalar field `number` of `msg`, in order, packed
/// or not (a parser must accept both): a varint as its value, a fixed-width element as its bits
/// (`f32::from_bits(v as u32)`, `f64::from_bits(v)`). An element encoded otherwise than `kind`
/// is [`WireError::WrongType`], as decoding refuses it.
pub fn repeated_scalars(
    msg: &[u8],
    number: u32,
    kind: Scalar,
    mut each: impl FnMut(u64),
) -> Result<(), WireError> {
    // Fixed widths read as such (a slice copied by its length is a `memcpy` call per element).
    let fixed = |b: &[u8]| match *b {
        [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
        _ => u64::from_le_bytes(b.try_into().unwrap_or_default()),
    };
    for f in fields(msg) {
        let f = f?;
        if f.number != number {
            continue;
        }
        match (kind, f.varint, f.fixed, f.payload) {
            (Scalar::Varint, Some(v), _, _) => each(v),
            (Scalar::Fixed32, _, Some(r), _) if r.len() == 4 => each(fixed(&msg[r])),
            (Scalar::Fixed64, _, Some(r), _) if r.len() == 8 => each(fixed(&msg[r])),
            // Bounded by the payload, so a varint cannot run on into the next field.
            (Scalar::Varint, _, _, Some(packed)) => varints(&msg[packed], &mut each)?,
            (Scalar::Fixed32 | Scalar::Fixed64, _, _, Some(packed)) => {
                let width = if kind == Scalar::Fixed32 { 4 } else { 8 };
                if packed.len() % width != 0 {
                    return Err(WireError::Malformed(packed.start));
                }
                msg[packed].chunks_exact(width).for_each(|b| each(fixed(b)));
            }
            _ => return Err(WireError::WrongType(number)),
        }
    }
    Ok(())
}

/// One field of a message, borrowed: its number and, by wire type, its value.
pub struct FieldRef<'a> {
    /// Field number.
    pub number: u32,
    /// A varint field's value.
    pub varint: Option<u64>,
    /// A length-delimited field's payload.
    pub payload: Option<&'a [u8]>,
}

/// Every field of `msg` in order (fixed-width fields carry neither a varint nor a payload); a
/// malformed message ends with one error.
pub fn scan(msg: &[u8]) -> impl Iterator<Item = Result<FieldRef<'_>, WireError>> + '_ {
    fields(msg).map(|f| {
        f.map(|f| FieldRef {
            number: f.number,
            varint: f.varint,
            payload: f.payload.map(|r| &msg[r]),
        })
    })
}

/// The value of string field `number` (the last occurrence wins, as when decoding), or `""`
/// when the message does not carry it.
pub fn string_field(msg: &[u8], number: u32) -> Result<String, WireError> {
    let mut found = None;
    for f in fields(msg) {
        let f = f?;
        if f.number == number {
            found = Some(f.payload.ok_or(WireError::Malformed(f.whole.start))?);
        }
    }
    match found {
        None => Ok(String::new()),
        Some(r) => std::str::from_utf8(&msg[r])
            .map(str::to_string)
            .map_err(|_| WireError::NotUtf8(number)),
    }
}

/// The bytes of embedded-message field `number` (the last occurrence), sharing `msg`'s buffer.
pub fn message_field(msg: &Bytes, number: u32) -> Result<Option<Bytes>, WireError> {
    Ok(field_range(msg, number)?.map(|r| msg.slice(r)))
}

/// The bytes of length-delimited field `number` (the last occurrence), borrowed from `msg`.
pub fn bytes_field(msg: &[u8], number: u32) -> Result<Option<&[u8]>, WireError> {
    Ok(field_range(msg, number)?.map(|r| &msg[r]))
}

/// Where the payloads of the length-delimited fields `numbers[k]` are in `msg`, each field's in
/// order (a repeated field's elements): one scan for several repeated fields, nothing copied or
/// shared (a few elements are kept inline).
pub fn repeated_fields<const N: usize>(
    msg: &[u8],
    numbers: [u32; N],
) -> Result<[Ranges; N], WireError> {
    let mut found: [Ranges; N] = std::array::from_fn(|_| Ranges::new());
    for f in fields(msg) {
        let f = f?;
        if let Some(k) = numbers.iter().position(|&n| n == f.number) {
            found[k].push(f.payload.ok_or(WireError::Malformed(f.whole.start))?);
        }
    }
    Ok(found)
}

/// Byte ranges of a message's fields, a few inline.
pub type Ranges = smallvec::SmallVec<[std::ops::Range<usize>; 4]>;

fn field_range(msg: &[u8], number: u32) -> Result<Option<std::ops::Range<usize>>, WireError> {
    let mut found = None;
    for f in fields(msg) {
        let f = f?;
        if f.number == number {
            found = Some(f.payload.ok_or(WireError::Malformed(f.whole.start))?);
        }
    }
    Ok(found)
}

/// `msg` with each of `edits`' string fields set to its value: earlier occurrences removed, the
/// new value appended (none for `""`, proto3's default). Every other field is kept as it was.
pub fn set_string_fields(msg: &[u8], edits: &[(u32, &str)]) -> Result<Bytes, WireError> {
    let edits: Vec<(u32, &[u8])> = edits.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
    set_fields(msg, &edits)
}

/// `msg` with each of `edits`' length-delimited fields (strings, bytes, embedded messages) set to
/// its encoded value, as [`set_string_fields`] does: earlier occurrences removed, the new value
/// appended, none when it is empty.
pub fn set_fields(msg: &[u8], edits: &[(u32, &[u8])]) -> Result<Bytes, WireError> {
    let mut out =
        BytesMut::with_capacity(msg.len() + edits.iter().map(|e| e.1.len() + 6).sum::<usize>());
    for f in fields(msg) {
        let f = f?;
        if !edits.iter().any(|(n, _)| *n == f.number) {
            out.extend_from_slice(&msg[f.whole]);
        }
    }
    for (number, value) in edits {
        if value.is_empty() {
            continue;
        }
        put_varint(&mut out, u64::from(*number) << 3 | 2);
        put_varint(&mut out, value.len() as u64);
        out.extend_from_slice(value);
    }
    Ok(out.freeze())
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn strings_are_read_and_rewritten_keeping_every_other_field() {
        let req = crate::pb::inference::ModelInferRequest {
            model_name: "iris".into(),
            model_version: "1".into(),
            id: "req-1".into(),
            raw_input_contents: vec![Bytes::from_static(&[1, 2, 3, 4])],
            ..Default::default()
        };
        let mut bytes = req.encode_to_vec();
        // A field modelgate's proto does not declare (number 99, varint 7) must survive.
        bytes.extend_from_slice(&[0x98, 0x06, 0x07]);
        assert_eq!(string_field(&bytes, 1).unwrap(), "iris");
        assert_eq!(string_field(&bytes, 2).unwrap(), "1");
        assert_eq!(string_field(&bytes, 9).unwrap(), "");

        let out = set_string_fields(&bytes, &[(1, "iris_onnx"), (2, "")]).unwrap();
        let back = crate::pb::inference::ModelInferRequest::decode(out.clone()).unwrap();
        assert_eq!(back.model_name, "iris_onnx");
        assert_eq!(back.model_version, "");
        assert_eq!(back.id, "req-1");
        assert_eq!(back.raw_input_contents, req.raw_input_contents);
        assert!(out.ends_with(b"iris_onnx"));
        assert!(
            out.windows(3).any(|w| w == [0x98, 0x06, 0x07]),
            "the unknown field is kept"
        );
        // The last occurrence wins, as in a decoder.
        let mut twice = bytes.clone();
        twice.extend_from_slice(&[0x0a, 0x02, b'v', b'2']);
        assert_eq!(string_field(&twice, 1).unwrap(), "v2");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &[0x0a, 0x05, b'a'][..], // length past the end
            &[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ][..],
            &[0x0b][..],       // group start
            &[0x00, 0x01][..], // field 0
            &[0x09, 1, 2][..], // fixed64 cut short
        ] {
            assert!(string_field(bad, 1).is_err(), "{bad:?}");
            assert!(set_string_fields(bad, &[(1, "x")]).is_err(), "{bad:?}");
        }
        assert_eq!(
            string_field(&[0x0a, 0x02, 0xff, 0xfe], 1),
            Err(WireError::NotUtf8(1))
        );
        assert_eq!(string_field(&[], 1).unwrap(), "");
    }
}

#[cfg(test)]
mod scalar_tests {
    use super::*;

    fn read(msg: &[u8], kind: Scalar) -> Result<Vec<u64>, WireError> {
        let mut out = Vec::new();
        repeated_scalars(msg, 1, kind, |v| out.push(v)).map(|()| out)
    }

    #[test]
    fn repeated_scalars_read_packed_and_unpacked_elements_in_order() {
        // 7 unpacked, then 300 and 1 packed, then 2 unpacked; field 2 is not read.
        let msg = [0x08, 7, 0x0a, 3, 0xac, 0x02, 1, 0x10, 9, 0x08, 2];
        assert_eq!(read(&msg, Scalar::Varint).unwrap(), [7, 300, 1, 2]);
        let mut fixed = vec![0x0d];
        fixed.extend(1.5f32.to_bits().to_le_bytes());
        fixed.extend([0x0a, 8]);
        fixed.extend(
            [
                2.5f32.to_bits().to_le_bytes(),
                3.5f32.to_bits().to_le_bytes(),
            ]
            .concat(),
        );
        let got: Vec<f32> = read(&fixed, Scalar::Fixed32)
            .unwrap()
            .into_iter()
            .map(|v| f32::from_bits(v as u32))
            .collect();
        assert_eq!(got, [1.5, 2.5, 3.5]);
        let mut double = vec![0x09];
        double.extend((-0.25f64).to_bits().to_le_bytes());
        assert_eq!(
            read(&double, Scalar::Fixed64).unwrap(),
            [(-0.25f64).to_bits()]
        );
    }

    #[test]
    fn repeated_scalars_refuse_what_decoding_refuses() {
        // A packed fixed32 payload that is not a multiple of 4 bytes.
        assert_eq!(
            read(&[0x0a, 5, 0, 0, 0, 0, 0], Scalar::Fixed32),
            Err(WireError::Malformed(2))
        );
        // A varint element where floats are declared, a fixed32 where varints are.
        assert_eq!(
            read(&[0x08, 1], Scalar::Fixed32),
            Err(WireError::WrongType(1))
        );
        assert_eq!(
            read(&[0x0d, 0, 0, 0, 0], Scalar::Varint),
            Err(WireError::WrongType(1))
        );
        // A packed varint that would run on past its payload.
        assert!(matches!(
            read(&[0x0a, 1, 0x80, 0x01], Scalar::Varint),
            Err(WireError::Malformed(_))
        ));
    }
}
