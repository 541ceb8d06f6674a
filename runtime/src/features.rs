//! Visual features where the vision graph left them, and the splice of their rows into a
//! prompt's embeddings (done by `embed.onnx`, on the device).
//!
//! On a GPU the vision graph's output is bound to device memory and stays there: prefill chunks
//! bind the same value as `embed.onnx`'s `visual_features` and send only `visual_index`, the
//! feature row of each position. Nothing of the features or the embeddings crosses to the host.
use ndarray::Array2;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::value::{DynValue, Tensor};

use crate::device::Device;
use crate::error::{Error, Result};

/// One video's or image's features, `[rows, hidden]`, in the memory of the device that made them.
#[derive(Debug)]
pub struct Features {
    value: Tensor<f32>,
    rows: usize,
    hidden: usize,
}

impl Features {
    /// Takes the vision graph's `[batch, tokens, hidden]` output (rows numbered across the batch).
    pub(crate) fn from_value(value: DynValue, what: &str) -> Result<Self> {
        let value = value
            .downcast::<ort::value::TensorValueType<f32>>()
            .map_err(|e| Error::Request(format!("{what}: not a float tensor ({e})")))?;
        let shape = value.shape().to_vec();
        match shape[..] {
            [batch, tokens, hidden] if batch > 0 && tokens > 0 && hidden > 0 => {
                Ok(Self { value, rows: (batch * tokens) as usize, hidden: hidden as usize })
            }
            _ => Err(Error::Request(format!("{what} has shape {shape:?}, expected [batch, tokens, hidden]"))),
        }
    }

    /// Features computed elsewhere (a reference implementation, a file), in host memory; ONNX
    /// Runtime copies them to the device when they are bound.
    pub fn from_host(features: Array2<f32>) -> Result<Self> {
        let (rows, hidden) = features.dim();
        let value = Tensor::from_array(
            features
                .into_shape_with_order((1, rows, hidden))
                .map_err(|e| Error::Request(format!("visual features: {e}")))?,
        )?;
        Ok(Self { value, rows, hidden })
    }

    /// Number of rows (visual tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Width of a row (the language model's hidden size).
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// A host copy, `[rows, hidden]` (from device memory, a transfer).
    pub fn to_host(&self) -> Result<Array2<f32>> {
        let host;
        let value = if self.value.memory_info().is_cpu_accessible() {
            &self.value
        } else {
            host = self.value.to(AllocationDevice::CPU, 0)?;
            &host
        };
        let (_, data) = value.try_extract_tensor::<f32>()?;
        Array2::from_shape_vec((self.rows, self.hidden), data.to_vec())
            .map_err(|e| Error::Request(format!("visual features: {e}")))
    }

    /// The value to bind as `embed.onnx`'s `visual_features`.
    pub(crate) fn value(&self) -> &Tensor<f32> {
        &self.value
    }
}

/// Rows of `features`, from row `first` on, replace the embeddings at the positions whose id is
/// `token`, in order.
pub struct Splice<'a> {
    /// The placeholder id.
    pub token: u32,
    /// The visual features.
    pub features: &'a Features,
    /// The row the first placeholder takes (later chunks of a prompt start further in).
    pub first: usize,
}

impl Splice<'_> {
    /// `embed.onnx`'s `visual_index` for `ids`: each placeholder's row, -1 elsewhere.
    pub(crate) fn index(&self, ids: &[u32]) -> Result<Vec<i64>> {
        let mut next = self.first;
        let index: Vec<i64> = ids
            .iter()
            .map(|&id| {
                if id == self.token {
                    next += 1;
                    (next - 1) as i64
                } else {
                    -1
                }
            })
            .collect();
        if next > self.features.rows {
            return Err(Error::Request(format!(
                "{} visual placeholders from feature row {} on, but the features have {} rows",
                next - self.first,
                self.first,
                self.features.rows
            )));
        }
        Ok(index)
    }
}

/// Where values that stay on the device between graphs are bound: the GPU's memory, or the
/// host's for the CPU.
pub(crate) fn device_memory(device: &Device) -> Result<MemoryInfo<'static>> {
    Ok(match device.gpu() {
        Some(id) => MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default)?,
        None => MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn placeholders_take_rows_in_order_from_first_and_overflow_is_refused() {
        crate::ort_env::environment().unwrap();
        let features = Features::from_host(Array2::zeros((5, 3))).unwrap();
        assert_eq!((features.rows(), features.hidden()), (5, 3));
        let splice = Splice { token: 9, features: &features, first: 2 };
        assert_eq!(splice.index(&[1, 9, 9, 4, 9]).unwrap(), vec![-1, 2, 3, -1, 4]);
        let err = splice.index(&[9, 9, 9, 9]).unwrap_err().to_string();
        assert!(err.contains("4 visual placeholders from feature row 2"), "{err}");
        assert_eq!(Splice { first: 0, ..splice }.index(&[1, 2]).unwrap(), vec![-1, -1]);
    }

    #[test]
    fn host_features_come_back_as_given() {
        crate::ort_env::environment().unwrap();
        let a = Array2::from_shape_fn((4, 2), |(r, c)| (r * 2 + c) as f32);
        assert_eq!(Features::from_host(a.clone()).unwrap().to_host().unwrap(), a);
    }
}
