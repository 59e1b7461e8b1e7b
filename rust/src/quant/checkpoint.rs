//! Streams a Hugging Face checkpoint (one file or sharded) into a 4-bit checkpoint laid out
//! exactly as transformers + bitsandbytes save one, so `from_pretrained` loads it with bitsandbytes.
//!
//! For each quantized linear layer `P` (every 2-D float `P.weight` whose module is not an
//! embedding and not in `skip`, by default `lm_head`), the output holds:
//!
//! ```text
//! P.weight                                     U8  (ceil(n/2), 1)   codes, first element high nibble
//! P.weight.absmax                              U8  (blocks,)        (F32 without double quant)
//! P.weight.quant_map                           F32 (16,)
//! P.weight.nested_absmax                       F32 (ceil(blocks/256),)   double quant only
//! P.weight.nested_quant_map                    F32 (256,)                double quant only
//! P.weight.quant_state.bitsandbytes__nf4       U8  (len,)  UTF-8 of json.dumps({"quant_type", "blocksize",
//!                                                          "dtype", "shape", "nested_blocksize",
//!                                                          "nested_dtype", "nested_offset"})
//! ```
//!
//! Every other tensor (embeddings, `lm_head`, norms, biases) is copied unchanged. Each output
//! shard is written by a streaming [`SafetensorsWriter`] (atomic), one tensor at a time; the input
//! is memory-mapped and its pages are released after each tensor, so peak memory stays near one
//! tensor. The JSON holds the double-quantization offset, so a first pass computes each offset
//! from the block absmax (cheap) before the header of a shard is written.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use super::nf4::{self, QuantType, NESTED_BLOCKSIZE};
use crate::error::{Error, Result};
use crate::io::safetensors::{SafeTensors, TensorInfo};
use crate::io::{atomic::write_atomic, Checkpoint, Dtype, SafetensorsWriter, TensorSpec};

/// How to quantize a checkpoint.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub blocksize: usize,
    pub quant_type: QuantType,
    /// Double-quantize the absmax (bitsandbytes' `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// Module names (or dotted suffixes) left in 16 bits besides embeddings.
    pub skip: Vec<String>,
    /// Print one line per tensor to stderr.
    pub progress: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            blocksize: 64,
            quant_type: QuantType::Nf4,
            double_quant: true,
            skip: vec!["lm_head".to_string()],
            progress: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeSummary {
    pub quantized_tensors: usize,
    pub kept_tensors: usize,
    pub quantized_elements: u64,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    pub files: Vec<String>,
}

/// Whether `name` is the weight of a linear layer to quantize.
pub fn is_quantized_weight(info: &TensorInfo, skip: &[String]) -> bool {
    let Some(module) = info.name.strip_suffix(".weight") else {
        return false;
    };
    let float = matches!(info.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32);
    let last = module.rsplit('.').next().unwrap_or(module);
    let skipped = skip
        .iter()
        .any(|s| module == s || module.ends_with(&format!(".{s}")) || last == s);
    float && info.shape.len() == 2 && !last.contains("embed") && !skipped
}

/// torch's name of a dtype as bitsandbytes writes it into the quant state.
fn torch_dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation for decimal
/// exponents -4..16 and `1e-05` style otherwise.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{x:e}"); // shortest round-trip digits: "-5.2e-2"
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!(
                "{sign}{digits}{}.0",
                "0".repeat(point as usize - digits.len())
            )
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

/// The packed quant state: `json.dumps` of bitsandbytes' non-tensor items, as bytes.
fn quant_state_json(info: &TensorInfo, options: &QuantizeOptions, offset: Option<f32>) -> String {
    let shape: Vec<String> = info.shape.iter().map(|d| d.to_string()).collect();
    let mut text = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        options.quant_type.as_str(),
        options.blocksize,
        torch_dtype_name(info.dtype),
        shape.join(", ")
    );
    if let Some(offset) = offset {
        text.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(offset as f64)
        ));
    }
    text.push('}');
    text
}

/// Calls `f` with the tensor's bytes viewed as `T` (copied only when misaligned).
fn with_typed<T: Copy + Default, R>(bytes: &[u8], f: impl FnOnce(&[T]) -> R) -> R {
    let size = std::mem::size_of::<T>();
    if (bytes.as_ptr() as usize) % std::mem::align_of::<T>() == 0 {
        // SAFETY: aligned and in bounds; T is a plain number type with no invalid bit patterns.
        f(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) })
    } else {
        let mut v = vec![T::default(); bytes.len() / size];
        // SAFETY: `v` holds exactly `bytes.len()` writable bytes (rounded down to whole elements).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                v.as_mut_ptr().cast::<u8>(),
                v.len() * size,
            )
        };
        f(&v)
    }
}

fn block_absmax_of(info: &TensorInfo, bytes: &[u8], blocksize: usize) -> Vec<f32> {
    match info.dtype {
        Dtype::BF16 => with_typed::<half::bf16, _>(bytes, |x| nf4::block_absmaxes(x, blocksize)),
        Dtype::F16 => with_typed::<half::f16, _>(bytes, |x| nf4::block_absmaxes(x, blocksize)),
        _ => with_typed::<f32, _>(bytes, |x| nf4::block_absmaxes(x, blocksize)),
    }
}

fn quantize_bytes(
    info: &TensorInfo,
    bytes: &[u8],
    options: &QuantizeOptions,
) -> Result<nf4::Quantized4bit> {
    let (bs, qt) = (options.blocksize, options.quant_type);
    match info.dtype {
        Dtype::BF16 => with_typed::<half::bf16, _>(bytes, |x| nf4::quantize_4bit(x, bs, qt)),
        Dtype::F16 => with_typed::<half::f16, _>(bytes, |x| nf4::quantize_4bit(x, bs, qt)),
        _ => with_typed::<f32, _>(bytes, |x| nf4::quantize_4bit(x, bs, qt)),
    }
}

/// Lets the kernel drop a finished tensor's pages from this process (they stay in the page cache).
fn release(file: &SafeTensors, info: &TensorInfo) {
    let page = 4096;
    let start = (file.data_start() + info.begin).div_ceil(page) * page;
    let end = (file.data_start() + info.end) / page * page;
    if end > start {
        // SAFETY: the map is private and nothing wrote to it here, so dropping its pages only
        // means they are read back from the file if touched again.
        let _ = unsafe {
            file.mmap().unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                end - start,
            )
        };
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The output specs of one input tensor.
fn output_specs(
    info: &TensorInfo,
    quantize: bool,
    options: &QuantizeOptions,
    offset: Option<f32>,
) -> Vec<TensorSpec> {
    if !quantize {
        return vec![TensorSpec::new(&info.name, info.dtype, info.shape.clone())];
    }
    let n = info.numel();
    let blocks = nf4::num_blocks(n, options.blocksize);
    let w = &info.name;
    let mut specs = vec![
        TensorSpec::new(w, Dtype::U8, vec![n.div_ceil(2), 1]),
        TensorSpec::new(
            format!("{w}.absmax"),
            if offset.is_some() {
                Dtype::U8
            } else {
                Dtype::F32
            },
            vec![blocks],
        ),
        TensorSpec::new(format!("{w}.quant_map"), Dtype::F32, vec![16]),
    ];
    if offset.is_some() {
        specs.push(TensorSpec::new(
            format!("{w}.nested_absmax"),
            Dtype::F32,
            vec![nf4::num_blocks(blocks, NESTED_BLOCKSIZE)],
        ));
        specs.push(TensorSpec::new(
            format!("{w}.nested_quant_map"),
            Dtype::F32,
            vec![256],
        ));
    }
    let json = quant_state_json(info, options, offset);
    specs.push(TensorSpec::new(
        format!(
            "{w}.quant_state.bitsandbytes__{}",
            options.quant_type.as_str()
        ),
        Dtype::U8,
        vec![json.len()],
    ));
    specs
}

/// The quantization_config transformers writes for this quantization.
fn quantization_config(options: &QuantizeOptions, compute_dtype: &str) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": options.quant_type.as_str(),
        "bnb_4bit_use_double_quant": options.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": Value::Null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    })
}

/// Quantizes the checkpoint folder `input` into `output` (created if needed).
pub fn quantize_checkpoint(
    input: &Path,
    output: &Path,
    options: &QuantizeOptions,
) -> Result<QuantizeSummary> {
    let started = Instant::now();
    nf4::check_blocksize(options.blocksize)?;
    let config_path = input.join("config.json");
    let config_text = std::fs::read(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut config: Value = serde_json::from_slice(&config_text)
        .map_err(|e| Error::format(&config_path, "json", format!("invalid JSON: {e}")))?;
    if config.get("quantization_config").is_some() {
        return Err(Error::format(
            &config_path,
            "quantization_config",
            "this checkpoint is already quantized",
        ));
    }
    let checkpoint = Checkpoint::open(input)?;
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;

    // Which tensors, and (first pass) their double-quantization offsets.
    let mut offsets: BTreeMap<String, Option<f32>> = BTreeMap::new();
    let mut total_elements = 0u64;
    let mut compute_dtype = None;
    for file in checkpoint.files() {
        for info in file.tensors() {
            if is_quantized_weight(info, &options.skip) {
                total_elements += info.numel() as u64;
                compute_dtype.get_or_insert(torch_dtype_name(info.dtype));
                let offset = options.double_quant.then(|| {
                    let absmax = block_absmax_of(info, file.slice(info), options.blocksize);
                    release(file, info);
                    nf4::absmax_mean(&absmax)
                });
                offsets.insert(info.name.clone(), offset);
            }
        }
    }

    let mut summary = QuantizeSummary {
        quantized_tensors: 0,
        kept_tensors: 0,
        quantized_elements: 0,
        input_bytes: 0,
        output_bytes: 0,
        seconds: 0.0,
        files: Vec::new(),
    };
    let mut weight_map = BTreeMap::new();
    let total_tensors: usize = checkpoint.files().iter().map(|f| f.tensors().len()).sum();
    let mut done = 0usize;
    let code = options.quant_type.code();
    let dynamic = nf4::dynamic_map_signed();
    for file in checkpoint.files() {
        let file_name = file
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model.safetensors".into());
        let mut specs = Vec::new();
        for info in file.tensors() {
            let offset = offsets.get(&info.name);
            let these = output_specs(info, offset.is_some(), options, offset.copied().flatten());
            for s in &these {
                weight_map.insert(s.name.clone(), file_name.clone());
            }
            specs.extend(these);
        }
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        let out_path = output.join(&file_name);
        let mut writer = SafetensorsWriter::create(&out_path, specs, &metadata)?;
        for info in file.tensors() {
            let bytes = file.slice(info);
            summary.input_bytes += bytes.len() as u64;
            let tensor_started = Instant::now();
            match offsets.get(&info.name) {
                None => {
                    writer.write(&info.name, bytes)?;
                    summary.output_bytes += bytes.len() as u64;
                    summary.kept_tensors += 1;
                }
                Some(offset) => {
                    let q = quantize_bytes(info, bytes, options)?;
                    let w = &info.name;
                    let mut parts: Vec<(String, Vec<u8>)> = vec![(w.clone(), q.packed)];
                    match offset {
                        Some(offset) => {
                            let nested = nf4::quantize_nested(&q.absmax, Some(*offset));
                            parts.push((format!("{w}.absmax"), nested.codes));
                            parts.push((format!("{w}.quant_map"), f32_bytes(&code)));
                            parts.push((format!("{w}.nested_absmax"), f32_bytes(&nested.absmax)));
                            parts.push((format!("{w}.nested_quant_map"), f32_bytes(&dynamic)));
                        }
                        None => {
                            parts.push((format!("{w}.absmax"), f32_bytes(&q.absmax)));
                            parts.push((format!("{w}.quant_map"), f32_bytes(&code)));
                        }
                    }
                    let json = quant_state_json(info, options, *offset);
                    parts.push((
                        format!(
                            "{w}.quant_state.bitsandbytes__{}",
                            options.quant_type.as_str()
                        ),
                        json.into_bytes(),
                    ));
                    for (name, data) in &parts {
                        writer.write(name, data)?;
                        summary.output_bytes += data.len() as u64;
                    }
                    summary.quantized_tensors += 1;
                    summary.quantized_elements += info.numel() as u64;
                }
            }
            release(file, info);
            done += 1;
            if options.progress && offsets.contains_key(&info.name) {
                let elapsed = started.elapsed().as_secs_f64();
                let rate = summary.quantized_elements as f64 / elapsed.max(1e-9);
                let eta = (total_elements - summary.quantized_elements) as f64 / rate.max(1.0);
                eprintln!(
                    "[{done}/{total_tensors}] {} {:?} {} -> {} in {:.2} s ({:.0} M el/s overall, ETA {:.0} s)",
                    info.name,
                    info.shape,
                    info.dtype,
                    options.quant_type.as_str(),
                    tensor_started.elapsed().as_secs_f64(),
                    rate / 1e6,
                    eta
                );
            }
        }
        writer.finish()?;
        summary.files.push(file_name);
    }

    if checkpoint.files().len() > 1 {
        let index = json!({
            "metadata": {"total_size": summary.output_bytes},
            "weight_map": weight_map,
        });
        write_atomic(
            output.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)
                .expect("index serializes")
                .as_bytes(),
        )?;
    }
    let dtype = compute_dtype.unwrap_or("bfloat16");
    config["quantization_config"] = quantization_config(options, dtype);
    let mut text = serde_json::to_string_pretty(&config).expect("config serializes");
    text.push('\n');
    write_atomic(output.join("config.json"), text.as_bytes())?;
    copy_side_files(input, output)?;
    summary.seconds = started.elapsed().as_secs_f64();
    if options.progress {
        eprintln!(
            "quantized {} tensors ({:.1} M elements, {} kept in 16 bits): {:.1} MB -> {:.1} MB in {:.1} s",
            summary.quantized_tensors,
            summary.quantized_elements as f64 / 1e6,
            summary.kept_tensors,
            summary.input_bytes as f64 / 1e6,
            summary.output_bytes as f64 / 1e6,
            summary.seconds
        );
    }
    Ok(summary)
}

/// Copies the tokenizer, generation config and other small files beside the weights.
fn copy_side_files(input: &Path, output: &Path) -> Result<()> {
    let entries = std::fs::read_dir(input).map_err(|e| Error::io(input, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors") || name.ends_with(".index.json");
        if !path.is_file() || is_weights || name == "config.json" || name.starts_with('.') {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        write_atomic(output.join(&name), &bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        for (x, text) in [
            (0.054912567138671875, "0.054912567138671875"),
            (1.0, "1.0"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456.0, "123456.0"),
            (1e16, "1e+16"),
            (-2.5e-3, "-0.0025"),
            (0.052_003_450_691_699_98, "0.05200345069169998"),
        ] {
            assert_eq!(python_float_repr(x), text);
        }
    }

    #[test]
    fn picks_linear_weights_only() {
        let info = |name: &str, shape: Vec<usize>| TensorInfo {
            name: name.into(),
            dtype: Dtype::BF16,
            shape,
            begin: 0,
            end: 0,
        };
        let skip = vec!["lm_head".to_string()];
        assert!(is_quantized_weight(
            &info("model.layers.0.mlp.up_proj.weight", vec![8, 4]),
            &skip
        ));
        assert!(!is_quantized_weight(
            &info("model.embed_tokens.weight", vec![8, 4]),
            &skip
        ));
        assert!(!is_quantized_weight(
            &info("lm_head.weight", vec![8, 4]),
            &skip
        ));
        assert!(!is_quantized_weight(
            &info("model.norm.weight", vec![8]),
            &skip
        ));
        assert!(!is_quantized_weight(
            &info("model.layers.0.self_attn.q_proj.bias", vec![8, 4]),
            &skip
        ));
    }
}
