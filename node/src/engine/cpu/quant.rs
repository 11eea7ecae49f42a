//! Quantized weight matrices and quantized activations, in the layouts mesh's kernels read.
//!
//! Weights come in blocks of 32 values with a scale, as in GGUF files. Three block types have
//! kernels of mesh's own ([`QFormat`]); a matrix of any other type is converted to Q8_0 when it
//! loads. At load each matrix is repacked once:
//! - the quantized values of a row lie contiguous, as unsigned bytes (Q8_0 stores `q + 128`;
//!   Q4 stores two values per byte, the first 32 of each 64 in the low nibbles), so the kernels
//!   multiply them with unsigned-by-signed byte instructions;
//! - scales (and Q4_1's minimums) lie apart, at half precision as in the file, one per block
//!   (decoding streams every byte of the weights, so they are kept as small as the file's).
//!
//! Activations are quantized per row to signed bytes in blocks of 32, as llama.cpp does
//! (`round(x / d)` with `d = max|x| / 127`, the scale kept at half precision), with each
//! block's sum, so a weight format's offset is corrected exactly in integers.

use half::f16;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// A weight block type with a kernel in mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// `w = d·q`, `q` in −127..=127.
    Q8_0,
    /// `w = d·(q − 8)`, `q` in 0..=15.
    Q4_0,
    /// `w = d·q + m`, `q` in 0..=15.
    Q4_1,
}

impl QFormat {
    /// What the kernel adds to each unsigned weight to get the signed value it stands for
    /// (the offset corrected with the activation block's sum).
    pub fn offset(self) -> i32 {
        match self {
            QFormat::Q8_0 => -128,
            QFormat::Q4_0 => -8,
            QFormat::Q4_1 => 0,
        }
    }

    /// Bytes of quantized values per row of `cols`.
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            QFormat::Q8_0 => cols,
            QFormat::Q4_0 | QFormat::Q4_1 => cols / 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QFormat::Q8_0 => "Q8_0",
            QFormat::Q4_0 => "Q4_0",
            QFormat::Q4_1 => "Q4_1",
        }
    }
}

/// A matrix of `rows` outputs over `cols` inputs.
pub struct QMatrix {
    pub(crate) format: QFormat,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// `rows × row_bytes` quantized values.
    pub(crate) values: Vec<u8>,
    /// `rows × blocks` scales.
    pub(crate) scales: Vec<f16>,
    /// `rows × blocks` minimums (Q4_1), else empty.
    pub(crate) mins: Vec<f16>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({}, {}x{})",
            self.format.name(),
            self.rows,
            self.cols
        )
    }
}

fn half_at(bytes: &[u8], at: usize) -> f16 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]])
}

impl QMatrix {
    pub fn format(&self) -> QFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub(crate) fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    pub(crate) fn row_bytes(&self) -> usize {
        self.format.row_bytes(self.cols)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.values.len() + 2 * (self.scales.len() + self.mins.len())
    }

    fn check_shape(rows: usize, cols: usize) -> Result<(), String> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(format!(
                "a row of {cols} is not a whole number of {BLOCK}-value blocks"
            ));
        }
        if rows == 0 {
            return Err("a matrix with no rows".into());
        }
        Ok(())
    }

    /// A matrix from GGUF blocks of `format` (`rows × cols / 32` blocks, row-major).
    pub fn from_gguf(
        format: QFormat,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix, String> {
        Self::check_shape(rows, cols)?;
        let blocks = cols / BLOCK;
        let block_bytes = match format {
            QFormat::Q8_0 => 34,
            QFormat::Q4_0 => 18,
            QFormat::Q4_1 => 20,
        };
        if bytes.len() != rows * blocks * block_bytes {
            return Err(format!(
                "{} bytes of {} blocks for a {rows}x{cols} matrix",
                bytes.len(),
                format.name()
            ));
        }
        let mut m = QMatrix {
            format,
            rows,
            cols,
            values: vec![0; rows * format.row_bytes(cols)],
            scales: vec![f16::ZERO; rows * blocks],
            mins: match format {
                QFormat::Q4_1 => vec![f16::ZERO; rows * blocks],
                _ => Vec::new(),
            },
        };
        let mut nibbles = vec![0u8; cols];
        for r in 0..rows {
            for b in 0..blocks {
                let at = (r * blocks + b) * block_bytes;
                let block = &bytes[at..at + block_bytes];
                m.scales[r * blocks + b] = half_at(block, 0);
                match format {
                    QFormat::Q8_0 => {
                        let dst = &mut m.values[r * cols + b * BLOCK..][..BLOCK];
                        for (d, q) in dst.iter_mut().zip(&block[2..]) {
                            *d = (*q as i8 as i16 + 128) as u8;
                        }
                    }
                    QFormat::Q4_0 | QFormat::Q4_1 => {
                        let qs = match format {
                            QFormat::Q4_1 => {
                                m.mins[r * blocks + b] = half_at(block, 2);
                                &block[4..]
                            }
                            _ => &block[2..],
                        };
                        for j in 0..16 {
                            nibbles[b * BLOCK + j] = qs[j] & 0x0F;
                            nibbles[b * BLOCK + j + 16] = qs[j] >> 4;
                        }
                    }
                }
            }
            if format != QFormat::Q8_0 {
                pack_nibbles(&nibbles, &mut m.values[r * cols / 2..][..cols / 2]);
            }
        }
        Ok(m)
    }

    /// `rows × cols` f32 values quantized to Q8_0 (a full-precision scale per block).
    pub fn quantize_q8_0(data: &[f32], rows: usize, cols: usize) -> Result<QMatrix, String> {
        Self::check_shape(rows, cols)?;
        if data.len() != rows * cols {
            return Err(format!("{} values for a {rows}x{cols} matrix", data.len()));
        }
        let blocks = cols / BLOCK;
        let mut m = QMatrix {
            format: QFormat::Q8_0,
            rows,
            cols,
            values: vec![0; rows * cols],
            scales: vec![f16::ZERO; rows * blocks],
            mins: Vec::new(),
        };
        for (i, block) in data.chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let kept = f16::from_f32(amax / 127.0);
            let d = kept.to_f32();
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            m.scales[i] = kept;
            for (dst, v) in m.values[i * BLOCK..][..BLOCK].iter_mut().zip(block) {
                *dst = ((v * id).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
            }
        }
        Ok(m)
    }

    /// `rows × cols` f32 values quantized to Q4_0 as llama.cpp does (`d = max / -8`, where
    /// `max` is the value of largest magnitude), with a full-precision scale.
    pub fn quantize_q4_0(data: &[f32], rows: usize, cols: usize) -> Result<QMatrix, String> {
        Self::check_shape(rows, cols)?;
        if data.len() != rows * cols {
            return Err(format!("{} values for a {rows}x{cols} matrix", data.len()));
        }
        let blocks = cols / BLOCK;
        let mut m = QMatrix {
            format: QFormat::Q4_0,
            rows,
            cols,
            values: vec![0; rows * cols / 2],
            scales: vec![f16::ZERO; rows * blocks],
            mins: Vec::new(),
        };
        let mut nibbles = vec![0u8; cols];
        for r in 0..rows {
            for b in 0..blocks {
                let block = &data[r * cols + b * BLOCK..][..BLOCK];
                let max = block
                    .iter()
                    .fold(0f32, |m, v| if v.abs() > m.abs() { *v } else { m });
                let kept = f16::from_f32(max / -8.0);
                let d = kept.to_f32();
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                m.scales[r * blocks + b] = kept;
                for (j, v) in block.iter().enumerate() {
                    nibbles[b * BLOCK + j] = ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                }
            }
            pack_nibbles(&nibbles, &mut m.values[r * cols / 2..][..cols / 2]);
        }
        Ok(m)
    }

    /// The matrices `parts`, of one format and width, as one whose rows are theirs in turn.
    pub fn stack(parts: Vec<QMatrix>) -> Result<QMatrix, String> {
        let mut parts = parts.into_iter();
        let mut all = parts.next().ok_or("no matrix to stack")?;
        for p in parts {
            if (p.format, p.cols) != (all.format, all.cols) {
                return Err(format!("cannot stack {p:?} under {all:?}"));
            }
            all.rows += p.rows;
            all.values.extend_from_slice(&p.values);
            all.scales.extend_from_slice(&p.scales);
            all.mins.extend_from_slice(&p.mins);
        }
        Ok(all)
    }

    /// The signed quantized value `i` of row `r` (before scale and minimum).
    fn value(&self, r: usize, i: usize) -> i32 {
        match self.format {
            QFormat::Q8_0 => self.values[r * self.cols + i] as i32 - 128,
            QFormat::Q4_0 | QFormat::Q4_1 => {
                nibble(&self.values[r * self.cols / 2..][..self.cols / 2], i) as i32
                    + self.format.offset()
            }
        }
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<(), String> {
        if r >= self.rows {
            return Err(format!(
                "token id {r} is past the vocabulary ({})",
                self.rows
            ));
        }
        let blocks = self.blocks();
        for (i, o) in out[..self.cols].iter_mut().enumerate() {
            let b = i / BLOCK;
            let mut v = self.scales[r * blocks + b].to_f32() * self.value(r, i) as f32;
            if self.format == QFormat::Q4_1 {
                v += self.mins[r * blocks + b].to_f32();
            }
            *o = v;
        }
        Ok(())
    }

    /// `out[t·rows + r] = Σ_i W[r][i]·x[t][i]` for the rows `rows` and every row `t` of `x`,
    /// the plain way: the reference the kernels are tested against.
    pub fn matmul_reference(&self, x: &QActs, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let blocks = self.blocks();
        for t in 0..x.rows {
            for r in rows.clone() {
                let mut sum = 0f32;
                for b in 0..blocks {
                    let mut dot = 0i32;
                    for i in b * BLOCK..(b + 1) * BLOCK {
                        dot += self.value(r, i) * x.values[t * self.cols + i] as i32;
                    }
                    let d = self.scales[r * blocks + b].to_f32();
                    sum += d * x.scales[t * blocks + b] * dot as f32;
                    if self.format == QFormat::Q4_1 {
                        sum += self.mins[r * blocks + b].to_f32() * x.sums[t * blocks + b];
                    }
                }
                out[t * self.rows + r] = sum;
            }
        }
    }
}

/// Nibble `i` of a row packed by [`pack_nibbles`].
fn nibble(packed: &[u8], i: usize) -> u8 {
    let (pair, within) = (i / 64, i % 64);
    if packed.len() % 32 == 16 && pair == packed.len() / 32 {
        // The tail block of an odd count: llama.cpp's own order.
        let byte = packed[pair * 32 + within % 16];
        return if within < 16 { byte & 0x0F } else { byte >> 4 };
    }
    let byte = packed[pair * 32 + within % 32];
    if within < 32 {
        byte & 0x0F
    } else {
        byte >> 4
    }
}

/// Packs one row of 4-bit values: each 64 values into 32 bytes, value `j` in the low nibble
/// of byte `j` and value `j + 32` in its high nibble; an odd last block of 32 as 16 bytes,
/// value `j` low and `j + 16` high.
fn pack_nibbles(values: &[u8], out: &mut [u8]) {
    let pairs = values.len() / 64;
    for p in 0..pairs {
        for j in 0..32 {
            out[p * 32 + j] = values[p * 64 + j] | (values[p * 64 + j + 32] << 4);
        }
    }
    if values.len() % 64 == 32 {
        let tail = &values[pairs * 64..];
        for j in 0..16 {
            out[pairs * 32 + j] = tail[j] | (tail[j + 16] << 4);
        }
    }
}

/// Activations quantized for a matmul: `rows` rows of `cols` signed bytes, in blocks.
#[derive(Default)]
pub struct QActs {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) values: Vec<i8>,
    /// Per block: the scale, rounded to half precision as llama.cpp keeps it.
    pub(crate) scales: Vec<f32>,
    /// Per block: `d · Σq` (for Q4_1's minimums).
    pub(crate) sums: Vec<f32>,
    /// Per block, 8 lanes: `offset · Σq` in the first lane, zeros after: what a kernel's
    /// integer accumulator starts from, so unsigned weights come out signed.
    pub(crate) corrections: Vec<i32>,
    /// Per block, 8 lanes: the scale repeated.
    pub(crate) lane_scales: Vec<f32>,
    /// The weight offset `corrections` was made for.
    pub(crate) offset: i32,
}

impl QActs {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Quantizes `rows × cols` values of `x`, for weights whose offset is `offset`
    /// ([`QFormat::offset`]). The buffers are reused from call to call.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize, offset: i32) {
        assert!(cols.is_multiple_of(BLOCK) && x.len() >= rows * cols);
        let blocks = cols / BLOCK;
        self.rows = rows;
        self.cols = cols;
        self.offset = offset;
        self.values.resize(rows * cols, 0);
        self.scales.resize(rows * blocks, 0.0);
        self.sums.resize(rows * blocks, 0.0);
        self.corrections.resize(rows * blocks * 8, 0);
        self.lane_scales.resize(rows * blocks * 8, 0.0);
        for (i, block) in x[..rows * cols].chunks_exact(BLOCK).enumerate() {
            let q = &mut self.values[i * BLOCK..][..BLOCK];
            let (d, sum) = super::simd::quantize_block(block, q);
            let kept = f16::from_f32(d).to_f32();
            self.scales[i] = kept;
            self.sums[i] = f16::from_f32(d * sum as f32).to_f32();
            let lanes = &mut self.corrections[i * 8..][..8];
            lanes.fill(0);
            lanes[0] = offset * sum;
            self.lane_scales[i * 8..][..8].fill(kept);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// GGUF blocks of `format` for a `rows × cols` matrix of pseudo-random values.
    pub(crate) fn gguf_blocks(format: QFormat, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            out.extend_from_slice(&d.to_le_bytes());
            match format {
                QFormat::Q8_0 => {
                    for _ in 0..BLOCK {
                        out.push((next() % 255) as u8 ^ 0x80);
                    }
                }
                QFormat::Q4_0 | QFormat::Q4_1 => {
                    if format == QFormat::Q4_1 {
                        let m = f16::from_f32(-0.01 + (next() % 100) as f32 * 1e-4);
                        out.extend_from_slice(&m.to_le_bytes());
                    }
                    for _ in 0..16 {
                        out.push(next() as u8);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn gguf_blocks_unpack_to_their_values() {
        // One Q4_1 row of one block: d = 0.5, m = -1, nibbles 0..15 then 15..0.
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            block.push(j | ((15 - j) << 4));
        }
        let m = QMatrix::from_gguf(QFormat::Q4_1, &block, 1, 32).unwrap();
        let mut row = vec![0f32; 32];
        m.row_f32(0, &mut row).unwrap();
        for j in 0..16 {
            assert_eq!(row[j], 0.5 * j as f32 - 1.0);
            assert_eq!(row[16 + j], 0.5 * (15 - j) as f32 - 1.0);
        }
        // Q8_0: d = 2, values -127, 0, 5, ...
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend((0..32).map(|i| [-127i8, 0, 5, 127][i % 4] as u8));
        let m = QMatrix::from_gguf(QFormat::Q8_0, &block, 1, 32).unwrap();
        m.row_f32(0, &mut row).unwrap();
        assert_eq!(&row[..4], &[-254.0, 0.0, 10.0, 254.0]);
        assert!(m.row_f32(1, &mut row).unwrap_err().contains("past"));
    }

    #[test]
    fn nibbles_pack_in_pairs_of_blocks_with_an_odd_tail() {
        for cols in [32, 64, 96, 576] {
            let values: Vec<u8> = (0..cols).map(|i| (i * 7 % 16) as u8).collect();
            let mut packed = vec![0u8; cols / 2];
            pack_nibbles(&values, &mut packed);
            for (i, v) in values.iter().enumerate() {
                assert_eq!(nibble(&packed, i), *v, "cols {cols}, value {i}");
            }
        }
    }

    #[test]
    fn q4_0_quantization_keeps_values_within_a_step() {
        let data: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let m = QMatrix::quantize_q4_0(&data, 1, 64).unwrap();
        let mut row = vec![0f32; 64];
        m.row_f32(0, &mut row).unwrap();
        for i in 0..64 {
            let step = m.scales[i / 32].to_f32().abs();
            // Half a step, or one where the clamp at 15 cuts the far extreme.
            assert!((row[i] - data[i]).abs() <= step + 1e-5, "{i}");
        }
        let stacked = QMatrix::stack(vec![m, QMatrix::quantize_q4_0(&data, 1, 64).unwrap()]);
        let stacked = stacked.unwrap();
        assert_eq!(stacked.rows(), 2);
        let mut again = vec![0f32; 64];
        stacked.row_f32(1, &mut again).unwrap();
        assert_eq!(row, again);
    }

    #[test]
    fn shapes_and_sizes_are_checked() {
        assert!(QMatrix::from_gguf(QFormat::Q8_0, &[0; 34], 1, 31).is_err());
        assert!(QMatrix::from_gguf(QFormat::Q8_0, &[0; 33], 1, 32).is_err());
        assert!(QMatrix::quantize_q8_0(&[0.0; 64], 3, 32).is_err());
    }

    #[test]
    fn q8_0_quantization_keeps_values_within_half_a_step() {
        let data: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let m = QMatrix::quantize_q8_0(&data, 2, 64).unwrap();
        let mut row = vec![0f32; 64];
        for r in 0..2 {
            m.row_f32(r, &mut row).unwrap();
            for i in 0..64 {
                let step = m.scales[r * 2 + i / 32].to_f32();
                assert!((row[i] - data[r * 64 + i]).abs() <= step / 2.0 + 1e-6);
            }
        }
    }

    #[test]
    fn activations_quantize_like_llama_cpp() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.1).collect();
        let mut a = QActs::default();
        a.quantize(&x, 2, 32, -128);
        // Row 0: max |x| = 2.0 at i = 0, so d = 2/127 and x = -2.0 maps to -127.
        assert_eq!(a.values[0], -127);
        assert_eq!(a.scales[0], f16::from_f32(2.0 / 127.0).to_f32());
        let sum: i32 = a.values[..32].iter().map(|v| *v as i32).sum();
        assert_eq!(a.corrections[0], -128 * sum);
        assert_eq!(&a.corrections[1..8], &[0; 7]);
        for (i, q) in a.values.iter().enumerate() {
            let block = &x[i / 32 * 32..][..32];
            let d = block.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            assert_eq!(*q as f32, (x[i] * (1.0 / d)).round(), "value {i}");
        }
    }
}
