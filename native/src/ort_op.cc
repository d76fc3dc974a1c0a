// The ONNX Runtime custom-op library: registers kvcompile::KVAttention,
// kvcompile::KVWindowAttention, kvcompile::KVQuantize and kvcompile::KVDequantize for the CPU
// execution provider, written against the ONNX Runtime C
// API only (headers: ../shared/third_party/onnxruntime-*).
//
// When a model also defines an op as a model-local function, ONNX Runtime runs this kernel if the
// library is registered and the function body if not, so one model.onnx serves both.
// Inputs: query, key, value, then the past parts (variadic, heterogeneous: int8 / float16 /
// float32); outputs: the attention output, then the present parts (variadic, heterogeneous).
#include <cstring>
#include <string>
#include <vector>

#include "kv_attention.h"
#include "e4m3.h"
#include "lloyd_codebooks.h"
#include "onnxruntime_c_api.h"

namespace {

const OrtApi* g_api = nullptr;

struct Kernel {
  kvc::AttentionSpec spec;  // KVWindowAttention when spec.window > 0
};

OrtStatus* status(const std::string& message) { return g_api->CreateStatus(ORT_FAIL, message.c_str()); }

#define KVC_RETURN_IF(expr)          \
  do {                               \
    if (OrtStatus* _s = (expr)) return _s; \
  } while (0)

OrtStatus* read_string(const OrtKernelInfo* info, const char* name, std::string* out) {
  size_t size = 0;
  if (OrtStatus* s = g_api->KernelInfoGetAttribute_string(info, name, nullptr, &size)) return s;
  std::vector<char> buf(size);
  KVC_RETURN_IF(g_api->KernelInfoGetAttribute_string(info, name, buf.data(), &size));
  out->assign(buf.data(), size ? size - 1 : 0);
  return nullptr;
}

int element_bytes(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return 1;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return 2;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    default: return 0;
  }
}

OrtStatus* view_of(const OrtValue* value, kvc::View* out) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  KVC_RETURN_IF(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  ONNXTensorElementDataType type;
  OrtStatus* s = g_api->GetDimensionsCount(info, &rank);
  if (!s) {
    out->dims.resize(rank);
    s = g_api->GetDimensions(info, out->dims.data(), rank);
  }
  if (!s) s = g_api->GetTensorElementType(info, &type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (s) return s;
  out->bytes = element_bytes(type);
  void* data = nullptr;
  KVC_RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->data = static_cast<const uint8_t*>(data);
  return nullptr;
}

struct ParallelJob {
  const std::function<void(size_t)>* fn;
};

void run_job(void* data, size_t i) { (*static_cast<ParallelJob*>(data)->fn)(i); }

using Parser = bool (*)(const kvc::Attributes&, kvc::AttentionSpec*, std::string*);

// A kernel from the node's string attributes `strings`, int attributes `ints` and float `scale`,
// parsed by `parse`.
OrtStatus* make_kernel(const OrtKernelInfo* info, const std::vector<std::string>& strings,
                       const std::vector<std::string>& ints, Parser parse, void** kernel) {
  kvc::Attributes attrs;
  for (const std::string& name : strings) KVC_RETURN_IF(read_string(info, name.c_str(), &attrs.strings[name]));
  for (const std::string& name : ints) KVC_RETURN_IF(g_api->KernelInfoGetAttribute_int64(info, name.c_str(), &attrs.ints[name]));
  KVC_RETURN_IF(g_api->KernelInfoGetAttribute_float(info, "scale", &attrs.floats["scale"]));
  auto* k = new Kernel;
  std::string error;
  if (!parse(attrs, &k->spec, &error)) {
    delete k;
    return status(error);
  }
  *kernel = k;
  return nullptr;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) {
  std::vector<std::string> strings;
  for (const char* stream : {"key", "value"})
    for (const char* name : {"sink_scheme", "recent_scheme", "bulk_scheme", "age_tiers"})
      strings.push_back(std::string(stream) + "_" + name);
  return make_kernel(info, strings, {"sink_tokens", "recent_window", "head_dim", "q_per_kv"}, kvc::parse_attention,
                     kernel);
}

OrtStatus* ORT_API_CALL create_window_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                             void** kernel) {
  return make_kernel(info, {"key_scheme", "value_scheme"}, {"window", "head_dim", "q_per_kv"},
                     kvc::parse_window_attention, kernel);
}

OrtStatus* ORT_API_CALL compute(void* kernel, OrtKernelContext* context) {
  const Kernel& k = *static_cast<Kernel*>(kernel);
  const std::string name = k.spec.window > 0 ? "KVWindowAttention" : "KVAttention";
  size_t n_inputs = 0;
  KVC_RETURN_IF(g_api->KernelContext_GetInputCount(context, &n_inputs));
  if (n_inputs < 3) return status(name + ": expected query, key, value and the past cache parts");
  std::vector<kvc::View> views(n_inputs);
  for (size_t i = 0; i < n_inputs; ++i) {
    const OrtValue* v = nullptr;
    KVC_RETURN_IF(g_api->KernelContext_GetInput(context, i, &v));
    KVC_RETURN_IF(view_of(v, &views[i]));
  }
  for (int i = 0; i < 3; ++i)
    if (views[i].bytes != 4) return status(name + ": query, key and value must be float32");
  std::vector<kvc::View> past(views.begin() + 3, views.end());
  OrtStatus* failure = nullptr;
  kvc::Allocate allocate = [&](size_t index, const std::vector<int64_t>& dims) -> uint8_t* {
    OrtValue* out = nullptr;
    if (OrtStatus* s = g_api->KernelContext_GetOutput(context, index, dims.data(), dims.size(), &out)) {
      if (!failure) failure = s;
      else g_api->ReleaseStatus(s);
      return nullptr;
    }
    void* data = nullptr;
    if (OrtStatus* s = g_api->GetTensorMutableData(out, &data)) {
      if (!failure) failure = s;
      else g_api->ReleaseStatus(s);
    }
    return static_cast<uint8_t*>(data);
  };
  kvc::ParallelFor parallel_for = [&](size_t n, const std::function<void(size_t)>& fn) {
    if (n == 0) return;
    ParallelJob job{&fn};
    if (OrtStatus* s = g_api->KernelContext_ParallelFor(context, run_job, n, 0, &job)) {
      g_api->ReleaseStatus(s);  // no thread pool: run here
      for (size_t i = 0; i < n; ++i) fn(i);
    }
  };
  std::string error;
  bool ok = kvc::run_attention(k.spec, views[0], views[1], views[2], past, allocate, parallel_for, &error);
  if (failure) return failure;
  if (!ok) return status(error);
  return nullptr;
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

// KVQuantize / KVDequantize (kvcompile/ops/quantize.py): one scheme (attributes `scheme`,
// `head_dim`), every [batch, head] slice quantized or de-quantized by formats.cc, the routines
// KVAttention stores and reads with (bit-identical to the torch references).
struct CodecKernel {
  kvc::Format format;
};

OrtStatus* ORT_API_CALL create_codec_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info,
                                            void** kernel) {
  std::string scheme, error;
  int64_t head_dim = 0;
  KVC_RETURN_IF(read_string(info, "scheme", &scheme));
  KVC_RETURN_IF(g_api->KernelInfoGetAttribute_int64(info, "head_dim", &head_dim));
  auto* k = new CodecKernel;
  if (!kvc::parse_format(scheme, head_dim, &k->format, &error)) {
    delete k;
    return status(error);
  }
  *kernel = k;
  return nullptr;
}

void ORT_API_CALL destroy_codec_kernel(void* kernel) { delete static_cast<CodecKernel*>(kernel); }

OrtStatus* allocate_output(OrtKernelContext* context, size_t index, const std::vector<int64_t>& dims, uint8_t** data) {
  OrtValue* out = nullptr;
  KVC_RETURN_IF(g_api->KernelContext_GetOutput(context, index, dims.data(), dims.size(), &out));
  void* p = nullptr;
  KVC_RETURN_IF(g_api->GetTensorMutableData(out, &p));
  *data = static_cast<uint8_t*>(p);
  return nullptr;
}

// states [B, H, T, D] float32 -> the format's parts [B, H, T / rows_per, width].
OrtStatus* ORT_API_CALL compute_quantize(void* kernel, OrtKernelContext* context) {
  const kvc::Format& f = static_cast<CodecKernel*>(kernel)->format;
  const OrtValue* v = nullptr;
  KVC_RETURN_IF(g_api->KernelContext_GetInput(context, 0, &v));
  kvc::View x;
  KVC_RETURN_IF(view_of(v, &x));
  if (x.bytes != 4 || x.dims.size() != 4 || x.dims[3] != f.head_dim)
    return status("KVQuantize " + f.name + ": expected states float32 [B, H, T, " + std::to_string(f.head_dim) + "]");
  const int64_t slices = x.dims[0] * x.dims[1], t = x.dims[2], d = f.head_dim;
  if (t % f.token_group)
    return status("KVQuantize " + f.name + ": " + std::to_string(t) + " positions; expected a multiple of " +
                  std::to_string(f.token_group));
  std::vector<uint8_t*> bases(f.parts.size());
  for (size_t i = 0; i < f.parts.size(); ++i)
    KVC_RETURN_IF(allocate_output(context, i, {x.dims[0], x.dims[1], t / f.parts[i].rows_per, f.parts[i].width},
                                  &bases[i]));
  const float* states = reinterpret_cast<const float*>(x.data);
  std::string error;
  for (int64_t s = 0; s < slices; ++s) {
    kvc::PartPtrs parts(f.parts.size());
    for (size_t i = 0; i < f.parts.size(); ++i)
      parts[i] = bases[i] + s * (t / f.parts[i].rows_per) * f.parts[i].row_bytes();
    if (!kvc::quantize_rows(f, states + s * t * d, t, parts, 0, &error)) return status("KVQuantize " + f.name + ": " + error);
  }
  return nullptr;
}

// the parts [B, H, T / rows_per, width] -> states [B, H, T, D] float32.
OrtStatus* ORT_API_CALL compute_dequantize(void* kernel, OrtKernelContext* context) {
  const kvc::Format& f = static_cast<CodecKernel*>(kernel)->format;
  size_t n = 0;
  KVC_RETURN_IF(g_api->KernelContext_GetInputCount(context, &n));
  if (n != f.parts.size())
    return status("KVDequantize " + f.name + ": expected " + std::to_string(f.parts.size()) + " parts, got " +
                  std::to_string(n));
  std::vector<kvc::View> views(n);
  for (size_t i = 0; i < n; ++i) {
    const OrtValue* v = nullptr;
    KVC_RETURN_IF(g_api->KernelContext_GetInput(context, i, &v));
    KVC_RETURN_IF(view_of(v, &views[i]));
  }
  const std::vector<int64_t>& lead = views[0].dims;
  if (lead.size() != 4) return status("KVDequantize " + f.name + ": expected parts [B, H, rows, width]");
  const int64_t t = lead[2] * f.parts[0].rows_per, d = f.head_dim, slices = lead[0] * lead[1];
  for (size_t i = 0; i < n; ++i) {
    const std::vector<int64_t>& dims = views[i].dims;
    if (views[i].bytes != f.parts[i].bytes || dims.size() != 4 || dims[0] != lead[0] || dims[1] != lead[1] ||
        dims[2] * f.parts[i].rows_per != t || dims[3] != f.parts[i].width)
      return status("KVDequantize " + f.name + ": part " + f.parts[i].name + " does not have the format's shape and type");
  }
  uint8_t* out = nullptr;
  KVC_RETURN_IF(allocate_output(context, 0, {lead[0], lead[1], t, d}, &out));
  for (int64_t s = 0; s < slices; ++s) {
    kvc::ConstPartPtrs parts(n);
    for (size_t i = 0; i < n; ++i) parts[i] = views[i].data + s * (t / f.parts[i].rows_per) * f.parts[i].row_bytes();
    kvc::dequantize_rows(f, parts, 0, t, reinterpret_cast<float*>(out) + s * t * d);
  }
  return nullptr;
}

const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "KVAttention"; }
const char* ORT_API_CALL window_op_name(const OrtCustomOp*) { return "KVWindowAttention"; }
const char* ORT_API_CALL provider(const OrtCustomOp*) { return nullptr; }  // CPU
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 4; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 2; }
ONNXTensorElementDataType ORT_API_CALL input_type(const OrtCustomOp*, size_t i) {
  return i < 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
ONNXTensorElementDataType ORT_API_CALL output_type(const OrtCustomOp*, size_t i) {
  return i < 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_characteristic(const OrtCustomOp*, size_t i) {
  return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_VARIADIC;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_characteristic(const OrtCustomOp*, size_t i) {
  return i < 1 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_VARIADIC;
}
OrtMemType ORT_API_CALL input_memory(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL min_arity(const OrtCustomOp*) { return 2; }
int ORT_API_CALL heterogeneous(const OrtCustomOp*) { return 0; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 1 << 30; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = provider;
  op.GetInputType = input_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = output_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = input_characteristic;
  op.GetOutputCharacteristic = output_characteristic;
  op.GetInputMemoryType = input_memory;
  op.GetVariadicInputMinArity = min_arity;
  op.GetVariadicInputHomogeneity = heterogeneous;
  op.GetVariadicOutputMinArity = min_arity;
  op.GetVariadicOutputHomogeneity = heterogeneous;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

OrtCustomOp make_window_op() {
  OrtCustomOp op = make_op();
  op.GetName = window_op_name;
  op.CreateKernelV2 = create_window_kernel;
  return op;
}

const char* ORT_API_CALL quantize_name(const OrtCustomOp*) { return "KVQuantize"; }
const char* ORT_API_CALL dequantize_name(const OrtCustomOp*) { return "KVDequantize"; }
size_t ORT_API_CALL one(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
ONNXTensorElementDataType ORT_API_CALL any_type(const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL variadic(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_VARIADIC; }
int ORT_API_CALL arity_one(const OrtCustomOp*) { return 1; }

// KVQuantize: states (float32) -> parts (variadic, heterogeneous); KVDequantize: the reverse.
OrtCustomOp make_codec_op(bool quantize) {
  OrtCustomOp op = make_op();
  op.GetName = quantize ? quantize_name : dequantize_name;
  op.GetInputTypeCount = one;
  op.GetOutputTypeCount = one;
  op.GetInputType = quantize ? float_type : any_type;
  op.GetOutputType = quantize ? any_type : float_type;
  op.GetInputCharacteristic = quantize ? required : variadic;
  op.GetOutputCharacteristic = quantize ? variadic : required;
  op.GetVariadicInputMinArity = arity_one;
  op.GetVariadicOutputMinArity = arity_one;
  op.CreateKernelV2 = create_codec_kernel;
  op.KernelComputeV2 = quantize ? compute_quantize : compute_dequantize;
  op.KernelDestroy = destroy_codec_kernel;
  return op;
}

OrtCustomOp g_attention_op = make_op();
OrtCustomOp g_quantize_op = make_codec_op(true);
OrtCustomOp g_dequantize_op = make_codec_op(false);
OrtCustomOp g_window_attention_op = make_window_op();

}  // namespace

extern "C" {

// Called by SessionOptions.register_custom_ops_library.
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (!g_api) return nullptr;  // an older runtime: cannot report through it
  OrtCustomOpDomain* domain = nullptr;
  KVC_RETURN_IF(g_api->CreateCustomOpDomain("kvcompile", &domain));
  KVC_RETURN_IF(g_api->CustomOpDomain_Add(domain, &g_attention_op));
  KVC_RETURN_IF(g_api->CustomOpDomain_Add(domain, &g_window_attention_op));
  KVC_RETURN_IF(g_api->CustomOpDomain_Add(domain, &g_quantize_op));
  KVC_RETURN_IF(g_api->CustomOpDomain_Add(domain, &g_dequantize_op));
  return g_api->AddCustomOpDomain(options, domain);
}

// What the library reads a scheme name as, for tests (kvcompile.kernels.native.describe_scheme):
// fields[8] = kind, bits, group, channel, symmetric, scale_bytes, rotate, double_quant; parts[4][4] =
// (bytes, width, rows_per, 0) per part.  Returns the number of parts, or -1 with `error` filled.
__attribute__((visibility("default"))) int kvc_describe_scheme(const char* name, int64_t head_dim, int64_t* fields,
                                                              int64_t* parts, char* error, int64_t error_size) {
  kvc::Format f;
  std::string why;
  if (!kvc::parse_format(name, head_dim, &f, &why)) {
    std::snprintf(error, size_t(error_size), "%s", why.c_str());
    return -1;
  }
  int64_t v[8] = {f.kind, f.bits, f.group, f.channel, f.symmetric, f.scale_bytes, f.rotate, f.double_quant};
  std::memcpy(fields, v, sizeof(v));
  for (size_t i = 0; i < f.parts.size() && i < 4; ++i) {
    parts[4 * i] = f.parts[i].bytes;
    parts[4 * i + 1] = f.parts[i].width;
    parts[4 * i + 2] = f.parts[i].rows_per;
    parts[4 * i + 3] = 0;
  }
  return int(f.parts.size());
}

__attribute__((visibility("default"))) void kvc_nf4_codebook(float* out) {
  std::memcpy(out, kvc::kNf4Codebook, sizeof(kvc::kNf4Codebook));
}

// E4M3 bytes of y[0..n) (|y| <= 448), as the fp8 format stores them (tests).
__attribute__((visibility("default"))) void kvc_e4m3_bytes(const float* y, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = kvc::e4m3_byte(y[i]);
}

// The 2^bits levels the library uses for lm<bits>[-ch]-g<group> (centred: -ch) (tests); returns
// their count, or -1 when it has no codebook for them.
__attribute__((visibility("default"))) int kvc_lloyd_codebook(int bits, int group, int centred, float* out) {
  const int book = kvc::lloyd_book(bits, group, centred);
  if (book < 0) return -1;
  for (int k = 0; k < (1 << bits); ++k) out[k] = kvc::lloyd_level(book, k);
  return 1 << bits;
}

}  // extern "C"
