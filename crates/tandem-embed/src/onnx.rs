//! Reading a BERT token classifier from a transformers.js-style 4-bit ONNX
//! export into f32 weights.
//!
//! Only the parts of ONNX such a file uses are read: the graph's
//! initializers and its `MatMulNBits` nodes (4 bits, block size 32, no zero
//! point input, so the zero point is 8: `w = (q − 8) · scale`, two values a
//! byte, low nibble first, blocks along the input dimension). Embeddings
//! are uint8 with a per-tensor scale and zero point; biases and LayerNorm
//! parameters are f32 under Hugging Face's names. Dequantized this way the
//! weights are exactly what onnxruntime multiplies by.

use std::collections::HashMap;

use prost::Message;

use crate::bert::{BertWeights, Dense, Layer, Norm};

/// The parts of `onnx.proto` read here (field numbers as in ONNX).
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int64, tag = "3")]
        pub i: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(int32, repeated, tag = "5")]
        pub int32_data: Vec<i32>,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
    }
}

const FLOAT: i32 = 1;
const UINT8: i32 = 2;

/// A classifier read from ONNX: the encoder and its `hidden → labels` head.
pub struct Loaded {
    /// The encoder.
    pub weights: BertWeights,
    /// The token-classification head.
    pub classifier: Dense,
}

struct Tensors {
    by_name: HashMap<String, proto::TensorProto>,
}

impl Tensors {
    fn get(&self, name: &str) -> Result<&proto::TensorProto, String> {
        self.by_name
            .get(name)
            .ok_or_else(|| format!("the model has no tensor `{name}`"))
    }

    fn f32s(&self, name: &str) -> Result<Vec<f32>, String> {
        let t = self.get(name)?;
        if t.data_type != FLOAT {
            return Err(format!("`{name}` is not float32"));
        }
        if !t.float_data.is_empty() {
            return Ok(t.float_data.clone());
        }
        if !t.raw_data.len().is_multiple_of(4) {
            return Err(format!("`{name}` has a partial float"));
        }
        Ok(t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn u8s(&self, name: &str) -> Result<Vec<u8>, String> {
        let t = self.get(name)?;
        if t.data_type != UINT8 {
            return Err(format!("`{name}` is not uint8"));
        }
        if !t.raw_data.is_empty() {
            return Ok(t.raw_data.clone());
        }
        // Small tensors may be stored as int32 values instead.
        Ok(t.int32_data.iter().map(|&v| v as u8).collect())
    }

    /// A uint8 tensor with a per-tensor scale and zero point, dequantized.
    fn dequantized(&self, base: &str) -> Result<Vec<f32>, String> {
        let q = self.u8s(&format!("{base}_quantized"))?;
        let scale = *self
            .f32s(&format!("{base}_scale"))?
            .first()
            .ok_or_else(|| format!("`{base}` has no scale"))?;
        let zero = f32::from(
            *self
                .u8s(&format!("{base}_zero_point"))?
                .first()
                .ok_or_else(|| format!("`{base}` has no zero point"))?,
        );
        Ok(q.into_iter()
            .map(|v| (f32::from(v) - zero) * scale)
            .collect())
    }
}

/// Dequantizes one `MatMulNBits` node's weight into a dense layer with
/// `bias`.
fn matmul_nbits(t: &Tensors, node: &proto::NodeProto, bias: Vec<f32>) -> Result<Dense, String> {
    let attr = |n: &str| {
        node.attribute
            .iter()
            .find(|a| a.name == n)
            .map(|a| a.i)
            .ok_or_else(|| format!("{}: no attribute {n}", node.name))
    };
    let (k, n, bits, block) = (attr("K")?, attr("N")?, attr("bits")?, attr("block_size")?);
    if bits != 4 || block <= 0 || node.input.len() != 3 {
        return Err(format!(
            "{}: only 4-bit weights without a zero-point input are read",
            node.name
        ));
    }
    let (k, n, block) = (k as usize, n as usize, block as usize);
    let blocks = k.div_ceil(block);
    let q = t.u8s(&node.input[1])?;
    let scales = t.f32s(&node.input[2])?;
    if q.len() != n * blocks * block / 2 || scales.len() != n * blocks || bias.len() != n {
        return Err(format!("{}: tensors of the wrong size", node.name));
    }
    let mut weight = vec![0f32; k * n];
    for out in 0..n {
        for b in 0..blocks {
            let scale = scales[out * blocks + b];
            let bytes = &q[(out * blocks + b) * block / 2..(out * blocks + b + 1) * block / 2];
            for (j, &byte) in bytes.iter().enumerate() {
                for (half, nibble) in [(0, byte & 0x0f), (1, byte >> 4)] {
                    let kk = b * block + 2 * j + half;
                    if kk < k {
                        weight[kk * n + out] = (f32::from(nibble) - 8.0) * scale;
                    }
                }
            }
        }
    }
    // The scales by block row, as `Dense::blocks` keeps them, when the
    // file's blocks are the integer kernels' (32 inputs, whole blocks).
    let blocks = (block == crate::quant::BLOCK && k.is_multiple_of(block)).then(|| {
        (0..blocks)
            .flat_map(|b| (0..n).map(move |out| (b, out)))
            .map(|(b, out)| scales[out * blocks + b])
            .collect()
    });
    Ok(Dense {
        inputs: k,
        outputs: n,
        weight,
        bias,
        blocks,
    })
}

/// Reads a `BertForTokenClassification` export with `layers` layers and
/// `heads` heads.
pub fn read(bytes: &[u8], heads: usize, eps: f32) -> Result<Loaded, String> {
    let model = proto::ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = model.graph.ok_or("the ONNX model has no graph")?;
    let tensors = Tensors {
        by_name: graph
            .initializer
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect(),
    };
    // `/bert/encoder/layer.3/attention/self/query/MatMul_Q4` → its place.
    let mut dense: HashMap<String, Dense> = HashMap::new();
    for node in graph.node.iter().filter(|n| n.op_type == "MatMulNBits") {
        let path = node
            .name
            .trim_start_matches('/')
            .trim_end_matches("/MatMul_Q4")
            .replace('/', ".");
        let bias = tensors.f32s(&format!("{path}.bias"))?;
        dense.insert(path, matmul_nbits(&tensors, node, bias)?);
    }
    let mut take = |path: &str| {
        dense
            .remove(path)
            .ok_or_else(|| format!("the model has no layer `{path}`"))
    };
    let norm = |path: &str| -> Result<Norm, String> {
        Ok(Norm {
            weight: tensors.f32s(&format!("{path}.weight"))?,
            bias: tensors.f32s(&format!("{path}.bias"))?,
        })
    };
    let mut layers = Vec::new();
    for i in 0.. {
        let p = format!("bert.encoder.layer.{i}");
        if !tensors
            .by_name
            .contains_key(&format!("{p}.attention.output.LayerNorm.weight"))
        {
            break;
        }
        let q = take(&format!("{p}.attention.self.query"))?;
        let k = take(&format!("{p}.attention.self.key"))?;
        let v = take(&format!("{p}.attention.self.value"))?;
        layers.push(Layer {
            qkv: Dense::concat(&[q, k, v]),
            output: take(&format!("{p}.attention.output.dense"))?,
            attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
            up: take(&format!("{p}.intermediate.dense"))?,
            down: take(&format!("{p}.output.dense"))?,
            output_norm: norm(&format!("{p}.output.LayerNorm"))?,
        });
    }
    let classifier = take("classifier")?;
    let hidden = classifier.inputs;
    let weights = BertWeights {
        hidden,
        heads,
        words: tensors.dequantized("bert.embeddings.word_embeddings.weight")?,
        positions: tensors.dequantized("bert.embeddings.position_embeddings.weight")?,
        token_types: tensors.dequantized("bert.embeddings.token_type_embeddings.weight")?,
        embedding_norm: norm("bert.embeddings.LayerNorm")?,
        layers,
        eps,
    };
    weights.check()?;
    Ok(Loaded {
        weights,
        classifier,
    })
}
