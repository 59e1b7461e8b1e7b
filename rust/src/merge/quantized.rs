//! 4-bit (bitsandbytes NF4 / FP4) base checkpoints, as `ferrotune quantize` and transformers +
//! bitsandbytes write them (see `crate::quant::checkpoint`): `P.weight` holds the packed codes and
//! its siblings `P.weight.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map` and
//! `.quant_state.bitsandbytes__{nf4,fp4}` (JSON: quant_type, blocksize, dtype, shape,
//! nested_offset) describe them. A merge targets the dequantized weights, rounded to the
//! original dtype exactly as bitsandbytes dequantizes them for the forward pass (the weights the
//! adapter was trained against); dequantization is `crate::quant::nf4`'s.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::{Checkpoint, Dtype};
use crate::quant::nf4::{self, QuantType};

/// Suffixes of the tensors that describe a packed weight (dropped from a 16-bit output).
const AUX_SUFFIXES: [&str; 4] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
];

/// Whether `name` is one of the statistics beside a packed 4-bit weight.
pub fn is_aux(name: &str) -> bool {
    name.contains(".weight.quant_state.")
        || (name.contains(".weight.") && AUX_SUFFIXES.iter().any(|s| name.ends_with(s)))
}

/// What the quant state of a packed weight says.
#[derive(Debug, Clone)]
pub struct QuantState {
    pub quant_type: QuantType,
    pub blocksize: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub nested_offset: Option<f32>,
}

/// The quant state of `weight_name`, or None when it is not a packed 4-bit weight.
pub fn quant_state(checkpoint: &Checkpoint, weight_name: &str) -> Result<Option<QuantState>> {
    for kind in ["nf4", "fp4"] {
        let key = format!("{weight_name}.quant_state.bitsandbytes__{kind}");
        let Some((file, info)) = checkpoint.get(&key) else {
            continue;
        };
        let bad = |m: &str| Error::format(file.path(), format!("tensor {key:?}"), m.to_string());
        let json: Value = serde_json::from_slice(file.slice(info))
            .map_err(|e| bad(&format!("quant state is not JSON: {e}")))?;
        let quant_type = QuantType::parse(
            json.get("quant_type")
                .and_then(Value::as_str)
                .unwrap_or(kind),
        )?;
        let blocksize = json
            .get("blocksize")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("quant state has no blocksize"))? as usize;
        nf4::check_blocksize(blocksize)?;
        let dtype = match json.get("dtype").and_then(Value::as_str) {
            Some("bfloat16") => Dtype::BF16,
            Some("float16") => Dtype::F16,
            Some("float32") => Dtype::F32,
            other => return Err(bad(&format!("quant state dtype {other:?}"))),
        };
        let shape = json
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad("quant state has no shape"))?;
        let nested_offset = json
            .get("nested_offset")
            .and_then(Value::as_f64)
            .map(|x| x as f32);
        return Ok(Some(QuantState {
            quant_type,
            blocksize,
            dtype,
            shape,
            nested_offset,
        }));
    }
    Ok(None)
}

fn f32_tensor(checkpoint: &Checkpoint, name: &str) -> Result<Vec<f32>> {
    let (file, info) = checkpoint
        .get(name)
        .ok_or_else(|| Error::InvalidArgument(format!("4-bit checkpoint lacks {name}")))?;
    if info.dtype != Dtype::F32 {
        return Err(Error::format(
            file.path(),
            format!("tensor {name:?}"),
            "must be F32",
        ));
    }
    Ok(super::convert::tensor_to_f32(file.slice(info), Dtype::F32))
}

/// The dequantized weight `weight_name` as bytes of its original dtype (`state.dtype`).
pub fn dequantize_weight(
    checkpoint: &Checkpoint,
    weight_name: &str,
    state: &QuantState,
) -> Result<Vec<u8>> {
    let (file, packed) = checkpoint
        .get(weight_name)
        .ok_or_else(|| Error::InvalidArgument(format!("no tensor {weight_name}")))?;
    let n: usize = state.shape.iter().product();
    let absmax = match state.nested_offset {
        None => f32_tensor(checkpoint, &format!("{weight_name}.absmax"))?,
        Some(offset) => {
            let (afile, ainfo) = checkpoint
                .get(&format!("{weight_name}.absmax"))
                .ok_or_else(|| {
                    Error::InvalidArgument(format!("4-bit checkpoint lacks {weight_name}.absmax"))
                })?;
            let nested = f32_tensor(checkpoint, &format!("{weight_name}.nested_absmax"))?;
            let map = f32_tensor(checkpoint, &format!("{weight_name}.nested_quant_map"))?;
            let map: [f32; 256] = map.try_into().map_err(|_| {
                Error::format(
                    afile.path(),
                    format!("{weight_name}.nested_quant_map"),
                    "must hold 256 values",
                )
            })?;
            nf4::dequantize_nested(afile.slice(ainfo), &nested, &map, offset)?
        }
    };
    let bytes = file.slice(packed);
    let out = match state.dtype {
        Dtype::BF16 => {
            let v: Vec<half::bf16> =
                nf4::dequantize_4bit(bytes, &absmax, n, state.blocksize, state.quant_type)?;
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
        }
        Dtype::F16 => {
            let v: Vec<half::f16> =
                nf4::dequantize_4bit(bytes, &absmax, n, state.blocksize, state.quant_type)?;
            v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
        }
        _ => {
            let v: Vec<f32> =
                nf4::dequantize_4bit(bytes, &absmax, n, state.blocksize, state.quant_type)?;
            v.iter().flat_map(|x| x.to_le_bytes()).collect()
        }
    };
    Ok(out)
}
