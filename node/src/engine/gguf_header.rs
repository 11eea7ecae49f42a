//! A GGUF file's header, read by mesh: its metadata and tensor index, so that a damaged or
//! hostile file is an error that says what is wrong, never a panic, and never an allocation
//! sized by what the file claims rather than by what it holds.
//!
//! The layout is llama.cpp's GGUF (versions 1 to 3): a magic, a version, the tensor and
//! metadata counts, the metadata entries, the tensor index, then the tensor data at the next
//! multiple of `general.alignment`. The result is candle's [`Content`], so candle and mesh's
//! own forward pass read tensors from it. Beyond the format, the reader bounds:
//! - every length and count by the bytes left in the file, so a 1 KiB file cannot ask for a
//!   gigabyte;
//! - the metadata values in all (an array of bytes would otherwise cost 32 bytes of memory per
//!   byte of file) and how deeply arrays nest;
//! - the alignment to a power of two, and the tensors to four dimensions with unique names.
//!
//! [`check_tensors`] then checks every tensor's extent against the file with checked
//! arithmetic before a load reads any of them.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

/// "GGUF" read as a little-endian `u32`.
const MAGIC: u32 = 0x4655_4747;
/// Metadata values in all, arrays' elements included: real vocabularies hold under a million.
pub const MAX_METADATA_VALUES: u64 = 1 << 23;
/// How deeply arrays may nest (llama.cpp writes none nested).
const MAX_DEPTH: usize = 4;
/// Dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// The alignment when the file sets none.
const DEFAULT_ALIGNMENT: u64 = 32;
/// The largest alignment believed.
const MAX_ALIGNMENT: u64 = 1 << 16;

/// A byte reader that knows how much of the file is left.
struct Header<R> {
    reader: R,
    position: u64,
    len: u64,
    version: VersionedMagic,
    values: u64,
}

impl<R: Read> Header<R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut buf = [0u8; N];
        self.reader.read_exact(&mut buf).map_err(|e| {
            format!(
                "the file ends inside {what} at byte {} (truncated?): {e}",
                self.position
            )
        })?;
        self.position += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.bytes(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.bytes(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.position)
    }

    /// A length or count (32 bits in version 1, 64 after), at least `each` bytes per item,
    /// that must fit in what is left of the file.
    fn count(&mut self, what: &str, each: u64) -> Result<u64, String> {
        let n = match self.version {
            VersionedMagic::GgufV1 => u64::from(self.u32(what)?),
            _ => self.u64(what)?,
        };
        if n.saturating_mul(each) > self.remaining() {
            return Err(format!(
                "{what} is {n}, more than the {} bytes left in the file hold",
                self.remaining()
            ));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.count(what, 1)?;
        let mut bytes = vec![0u8; len as usize];
        self.reader
            .read_exact(&mut bytes)
            .map_err(|e| format!("the file ends inside {what} (truncated?): {e}"))?;
        self.position += len;
        // Strings are meant to be UTF-8 without a terminator; some writers add NULs.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn counted(&mut self, n: u64) -> Result<(), String> {
        self.values = self.values.saturating_add(n);
        if self.values > MAX_METADATA_VALUES {
            return Err(format!(
                "the metadata holds more than {MAX_METADATA_VALUES} values"
            ));
        }
        Ok(())
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<Value, String> {
        self.counted(1)?;
        Ok(match kind {
            0 => Value::U8(self.bytes::<1>(key)?[0]),
            1 => Value::I8(self.bytes::<1>(key)?[0] as i8),
            2 => Value::U16(self.bytes(key).map(u16::from_le_bytes)?),
            3 => Value::I16(self.bytes(key).map(i16::from_le_bytes)?),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.bytes(key).map(i32::from_le_bytes)?),
            6 => Value::F32(self.bytes(key).map(f32::from_le_bytes)?),
            7 => match self.bytes::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{key}: {b} is not a boolean")),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{key}: arrays nest more than {MAX_DEPTH} deep"));
                }
                let kind = self.u32(key)?;
                let each = match kind {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 | 9 => 4,
                    8 => self.length_size(),
                    10..=12 => 8,
                    other => return Err(format!("{key}: unknown element type {other}")),
                };
                let n = self.count(key, each)?;
                self.counted(n)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(kind, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.bytes(key).map(i64::from_le_bytes)?),
            12 => Value::F64(self.bytes(key).map(f64::from_le_bytes)?),
            other => return Err(format!("{key}: unknown value type {other}")),
        })
    }

    fn length_size(&self) -> u64 {
        match self.version {
            VersionedMagic::GgufV1 => 4,
            _ => 8,
        }
    }

    fn tensor(&mut self) -> Result<(String, TensorInfo), String> {
        let name = self.string("a tensor name")?;
        let dims = self.u32("a tensor's dimension count")?;
        if dims > MAX_DIMS {
            return Err(format!(
                "tensor {name:?} has {dims} dimensions, more than {MAX_DIMS}"
            ));
        }
        let mut shape = Vec::with_capacity(dims as usize);
        for _ in 0..dims {
            let d = match self.version {
                VersionedMagic::GgufV1 => u64::from(self.u32(&name)?),
                _ => self.u64(&name)?,
            };
            shape.push(
                usize::try_from(d).map_err(|_| format!("tensor {name:?}: {d} is too large"))?,
            );
        }
        // The file lists the fastest-moving dimension first; candle's shapes list it last.
        shape.reverse();
        let ggml_dtype = dtype(self.u32(&name)?)
            .ok_or_else(|| format!("tensor {name:?} has an unknown type"))?;
        let offset = self.u64(&name)?;
        Ok((
            name,
            TensorInfo {
                ggml_dtype,
                shape: candle_core::Shape::from(shape),
                offset,
            },
        ))
    }
}

/// ggml's tensor type numbers, for the types candle reads.
fn dtype(n: u32) -> Option<GgmlDType> {
    Some(match n {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Reads the metadata and tensor index from the start of `file`; the tensor data is not
/// touched.
pub fn read<R: Read + Seek>(file: &mut R) -> Result<Content, String> {
    let len = file
        .seek(SeekFrom::End(0))
        .and_then(|len| file.seek(SeekFrom::Start(0)).map(|_| len))
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let mut header = Header {
        reader: BufReader::with_capacity(1 << 16, file),
        position: 0,
        len,
        version: VersionedMagic::GgufV3,
        values: 0,
    };
    let magic = header
        .u32("the magic")
        .map_err(|_| "not a GGUF file: it is shorter than its magic".to_string())?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: it starts with {:02x?}",
            magic.to_le_bytes()
        ));
    }
    header.version = match header.u32("the version")? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(format!("GGUF version {v} is not supported (1 to 3 are)")),
    };
    let prefix = header.length_size();
    let tensors = header.count("the tensor count", prefix + 4 + 4 + 8)?;
    let entries = header.count("the metadata count", prefix + 4 + 1)?;
    let mut metadata = HashMap::new();
    for _ in 0..entries {
        let key = header.string("a metadata key")?;
        let kind = header.u32(&key)?;
        let value = header.value(kind, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("the metadata names {key:?} twice"));
        }
    }
    let mut tensor_infos = HashMap::new();
    for _ in 0..tensors {
        let (name, info) = header.tensor()?;
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(format!("the file holds two tensors named {name:?}"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() && u64::from(*a) <= MAX_ALIGNMENT => {
            u64::from(*a)
        }
        Some(other) => {
            return Err(format!(
                "general.alignment {other:?} is not a power of two up to {MAX_ALIGNMENT}"
            ))
        }
    };
    Ok(Content {
        magic: header.version,
        metadata,
        tensor_infos,
        tensor_data_offset: header.position.div_ceil(alignment) * alignment,
    })
}

/// The number of values in a tensor of this shape, if it fits in 64 bits.
fn elements(info: &TensorInfo) -> Option<u64> {
    info.shape
        .dims()
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
}

/// The bytes a tensor's data takes in the file.
fn data_bytes(name: &str, info: &TensorInfo) -> Result<u64, String> {
    let elements = elements(info)
        .ok_or_else(|| format!("tensor {name:?} declares an impossible shape {info:?}"))?;
    let block = info.ggml_dtype.block_size() as u64;
    if !elements.is_multiple_of(block) {
        return Err(format!(
            "tensor {name:?} has {elements} values, not a whole number of {:?} blocks of {block}",
            info.ggml_dtype
        ));
    }
    (elements / block)
        .checked_mul(info.ggml_dtype.type_size() as u64)
        .ok_or_else(|| format!("tensor {name:?} declares an impossible size"))
}

/// Checks that every tensor the index names lies inside a file of `file_len` bytes, so that
/// reading one allocates no more than the file holds.
pub fn check_tensors(content: &Content, file_len: u64) -> Result<(), String> {
    for (name, info) in &content.tensor_infos {
        let bytes = data_bytes(name, info)?;
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(format!(
                    "tensor {name:?} ({bytes} bytes at offset {}) lies past the end of the \
                     {file_len}-byte file (truncated?)",
                    info.offset
                ))
            }
        }
    }
    Ok(())
}

/// The number of weights the file holds, saturating rather than overflowing on a hostile
/// shape.
pub fn parameters(content: &Content) -> u64 {
    content
        .tensor_infos
        .values()
        .map(|t| elements(t).unwrap_or(u64::MAX))
        .fold(0u64, u64::saturating_add)
}

/// GGUF files built in memory, for tests.
#[cfg(test)]
pub(crate) mod test_files {
    use candle_core::quantized::gguf_file::{self, Value};

    /// A GGUF file with these metadata entries and one F32 tensor `w` of `dims`, with `data`
    /// bytes after the header (the tensor's data cut or padded to that).
    pub fn file(metadata: &[(&str, Value)], dims: &[usize], data: usize) -> Vec<u8> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        let entries: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let zeros =
            candle_core::Tensor::zeros(dims, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let tensor = candle_core::quantized::QTensor::quantize(
            &zeros,
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        gguf_file::write(&mut bytes, &entries, &[("w", &tensor)]).unwrap();
        let mut bytes = bytes.into_inner();
        // A header mesh refuses is left whole, for the test to see refused.
        if let Ok(content) = super::read(&mut std::io::Cursor::new(&bytes)) {
            bytes.resize(content.tensor_data_offset as usize + data, 0);
        }
        bytes
    }

    pub fn tokenizer_metadata() -> Vec<(&'static str, Value)> {
        let strings =
            |s: &[&str]| Value::Array(s.iter().map(|t| Value::String(t.to_string())).collect());
        vec![
            ("general.architecture", Value::String("llama".into())),
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.tokens",
                strings(&["a", "b", "ab", "<|im_end|>"]),
            ),
            ("tokenizer.ggml.merges", strings(&["a b"])),
            ("tokenizer.ggml.eos_token_id", Value::U32(3)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::test_files::{file, tokenizer_metadata};
    use super::*;

    fn read_bytes(bytes: &[u8]) -> Result<Content, String> {
        read(&mut std::io::Cursor::new(bytes))
    }

    #[test]
    fn mesh_reads_what_candle_reads() {
        let mut metadata = tokenizer_metadata();
        metadata.push(("general.alignment", Value::U32(64)));
        metadata.push((
            "x.nested",
            Value::Array(vec![Value::Array(vec![Value::F64(1.5)])]),
        ));
        let bytes = file(&metadata, &[3, 4, 8], 3 * 4 * 8 * 4);
        let ours = read_bytes(&bytes).unwrap();
        let candles = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(ours.tensor_data_offset, candles.tensor_data_offset);
        assert_eq!(ours.tensor_data_offset % 64, 0);
        assert_eq!(
            format!("{:?}", ours.tensor_infos),
            format!("{:?}", candles.tensor_infos)
        );
        let mut keys: Vec<_> = ours.metadata.keys().collect();
        keys.sort();
        assert_eq!(keys.len(), candles.metadata.len());
        for key in keys {
            assert_eq!(
                format!("{:?}", ours.metadata[key]),
                format!("{:?}", candles.metadata[key])
            );
        }
        assert_eq!(check_tensors(&ours, bytes.len() as u64), Ok(()));
        assert_eq!(parameters(&ours), 96);
    }

    #[test]
    fn a_truncated_tensor_is_named_before_anything_is_read() {
        let bytes = file(&tokenizer_metadata(), &[4, 8], 100);
        let content = read_bytes(&bytes).unwrap();
        let err = check_tensors(&content, bytes.len() as u64).unwrap_err();
        assert!(
            err.contains("\"w\"") && err.contains("past the end"),
            "{err}"
        );
    }

    #[test]
    fn an_alignment_that_is_not_a_power_of_two_is_an_error() {
        for bad in [
            Value::U32(0),
            Value::U32(48),
            Value::U32(1 << 20),
            Value::I8(-1),
        ] {
            let mut metadata = tokenizer_metadata();
            metadata.push(("general.alignment", bad));
            let err = read_bytes(&file(&metadata, &[4], 16)).unwrap_err();
            assert!(err.contains("general.alignment"), "{err}");
        }
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused() {
        let bytes = file(&tokenizer_metadata(), &[4], 16);
        let mut content = read_bytes(&bytes).unwrap();
        let info = content.tensor_infos.get_mut("w").unwrap();
        info.shape = candle_core::Shape::from(vec![usize::MAX / 2, 4]);
        let err = check_tensors(&content, bytes.len() as u64).unwrap_err();
        assert!(err.contains("impossible"), "{err}");
        assert_eq!(parameters(&content), u64::MAX);
    }

    #[test]
    fn lengths_past_the_end_of_the_file_are_refused_before_allocating() {
        let bytes = file(&tokenizer_metadata(), &[4], 16);
        // The first key's length (after magic, version and two counts) claims 2^40 bytes.
        let mut long_key = bytes.clone();
        long_key[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let err = read_bytes(&long_key).unwrap_err();
        assert!(err.contains("bytes left"), "{err}");
        // The tensor count claims more tensors than the file could hold.
        let mut many = bytes.clone();
        many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = read_bytes(&many).unwrap_err();
        assert!(err.contains("tensor count"), "{err}");
        // Every prefix cut inside the header is an error, never a panic; the first that
        // reads is the whole index, short of at most the alignment's padding.
        let whole = read_bytes(&bytes).unwrap();
        let first = (0..bytes.len())
            .find(|&cut| read_bytes(&bytes[..cut]).is_ok())
            .unwrap();
        assert!(
            first as u64 > whole.tensor_data_offset - DEFAULT_ALIGNMENT,
            "{first}"
        );
        let cut = read_bytes(&bytes[..first]).unwrap();
        assert_eq!(
            format!("{:?}", cut.tensor_infos),
            format!("{:?}", whole.tensor_infos)
        );
    }

    #[test]
    fn a_name_given_twice_is_refused() {
        let mut metadata = tokenizer_metadata();
        metadata.push(("general.architecture", Value::String("gemma3".into())));
        let err = read_bytes(&file(&metadata, &[4], 16)).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn not_a_gguf_file_says_so() {
        let err = read_bytes(b"GGUF but not really").unwrap_err();
        assert!(err.contains("GGUF version"), "{err}");
        let err = read_bytes(b"PK\x03\x04 a zip").unwrap_err();
        assert!(err.contains("not a GGUF file"), "{err}");
    }
}
