// libkvcompile_trt.so: the KVAttention op of kvcompile/ops/attention.py and the KVWindowAttention op
// of kvcompile/ops/window_attention.py as TensorRT IPluginV3s (IPluginV3OneCore/Build/Runtime +
// IPluginCreatorV3One; names "KVAttention" and "KVWindowAttention", version "1", namespace
// "kvcompile"; one plugin class, the op's attributes parsed into one AttentionSpec).  Written against the TensorRT 10 headers only: it links nothing from
// TensorRT or CUDA, loads into full TensorRT and TensorRT-RTX alike, and launches its kernels
// through the CUDA driver API opened at run time (cuda_driver.cc).
//
// Fields are the ONNX node's attributes (strings as CHAR, ints as INT32, scale as FLOAT32); the
// host logic (shapes, workspace, parameters) is enqueue.h's, shared with the CPU tests.
#include <NvInferRuntime.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_driver.h"
#include "enqueue.h"

using namespace nvinfer1;

namespace kvc_trt {

namespace {

constexpr const char* kVersion = "1";  // the ops' OpSpec.version
constexpr const char* kNamespace = "kvcompile";

// An op's attributes, in its OpSpec's ATTRIBUTES order, with the field type the ONNX parser
// delivers for each.
struct FieldSpec {
  const char* name;
  PluginFieldType type;
};
const FieldSpec kAttentionFields[] = {  // kvcompile.ops.attention
    {"key_sink_scheme", PluginFieldType::kCHAR},   {"key_recent_scheme", PluginFieldType::kCHAR},
    {"key_bulk_scheme", PluginFieldType::kCHAR},   {"key_age_tiers", PluginFieldType::kCHAR},
    {"value_sink_scheme", PluginFieldType::kCHAR}, {"value_recent_scheme", PluginFieldType::kCHAR},
    {"value_bulk_scheme", PluginFieldType::kCHAR}, {"value_age_tiers", PluginFieldType::kCHAR},
    {"sink_tokens", PluginFieldType::kINT32},      {"recent_window", PluginFieldType::kINT32},
    {"head_dim", PluginFieldType::kINT32},         {"q_per_kv", PluginFieldType::kINT32},
    {"scale", PluginFieldType::kFLOAT32},
};
const FieldSpec kWindowFields[] = {  // kvcompile.ops.window_attention
    {"key_scheme", PluginFieldType::kCHAR}, {"value_scheme", PluginFieldType::kCHAR},
    {"window", PluginFieldType::kINT32},    {"head_dim", PluginFieldType::kINT32},
    {"q_per_kv", PluginFieldType::kINT32},  {"scale", PluginFieldType::kFLOAT32},
};

// One plugin per op: its name, fields and attribute parser (both ops share the kernels).
struct OpKind {
  const char* name;
  const FieldSpec* fields;
  size_t num_fields;
  bool (*parse)(const kvc::Attributes&, AttentionSpec*, std::string*);
  const FieldSpec* begin() const { return fields; }
  const FieldSpec* end() const { return fields + num_fields; }
};
const OpKind kAttention{"KVAttention", kAttentionFields, sizeof(kAttentionFields) / sizeof(FieldSpec),
                        kvc::parse_attention};
const OpKind kWindowAttention{"KVWindowAttention", kWindowFields, sizeof(kWindowFields) / sizeof(FieldSpec),
                              kvc::parse_window_attention};

ILoggerFinder* g_logger_finder = nullptr;

void log_error(const std::string& message) {
  ILogger* logger = g_logger_finder ? g_logger_finder->findLogger() : nullptr;
  if (logger) logger->log(ILogger::Severity::kERROR, message.c_str());
}

DataType data_type(int bytes) {
  return bytes == 4 ? DataType::kFLOAT : bytes == 2 ? DataType::kHALF : DataType::kINT8;
}

// Attributes from plugin fields, whatever numeric type a caller used.
bool attributes_from_fields(const OpKind& kind, const PluginFieldCollection* fc, kvc::Attributes* out,
                            std::string* error) {
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    const PluginField& f = fc->fields[i];
    const FieldSpec* spec = nullptr;
    for (const auto& s : kind)
      if (f.name && std::strcmp(f.name, s.name) == 0) spec = &s;
    if (!spec) continue;
    if (spec->type == PluginFieldType::kCHAR) {
      const char* text = static_cast<const char*>(f.data);
      out->strings[spec->name] = text ? std::string(text, strnlen(text, size_t(f.length))) : std::string();
      continue;
    }
    if (f.length < 1 || !f.data) {
      *error = std::string(kind.name) + ": field " + spec->name + " is empty";
      return false;
    }
    double v;
    switch (f.type) {
      case PluginFieldType::kINT8: v = *static_cast<const int8_t*>(f.data); break;
      case PluginFieldType::kINT16: v = *static_cast<const int16_t*>(f.data); break;
      case PluginFieldType::kINT32: v = *static_cast<const int32_t*>(f.data); break;
      case PluginFieldType::kINT64: v = double(*static_cast<const int64_t*>(f.data)); break;
      case PluginFieldType::kFLOAT32: v = *static_cast<const float*>(f.data); break;
      case PluginFieldType::kFLOAT64: v = *static_cast<const double*>(f.data); break;
      default:
        *error = std::string(kind.name) + ": field " + spec->name + " has an unsupported type";
        return false;
    }
    if (spec->type == PluginFieldType::kFLOAT32) out->floats[spec->name] = float(v);
    else out->ints[spec->name] = int64_t(v);
  }
  return true;
}

// IExprBuilder as an integer backend for enqueue.h's shape templates.
struct ExprOps {
  using T = const IDimensionExpr*;
  IExprBuilder& b;
  T constant(int64_t v) { return b.constant(v); }
  T op(DimensionOperation o, T x, T y) { return b.operation(o, *x, *y); }
  T add(T x, T y) { return op(DimensionOperation::kSUM, x, y); }
  T sub(T x, T y) { return op(DimensionOperation::kSUB, x, y); }
  T min(T x, T y) { return op(DimensionOperation::kMIN, x, y); }
  T max(T x, T y) { return op(DimensionOperation::kMAX, x, y); }
  T floor_div(T x, int64_t y) { return y == 1 ? x : op(DimensionOperation::kFLOOR_DIV, x, constant(y)); }
  T mul(T x, int64_t y) { return y == 1 ? x : op(DimensionOperation::kPROD, x, constant(y)); }
};

}  // namespace

class KVAttentionPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  KVAttentionPlugin(const OpKind& kind, const kvc::Attributes& attrs, const AttentionSpec& spec)
      : kind_(kind), attrs_(attrs), spec_(spec) {
    in_bytes_ = input_bytes(spec_);
    out_bytes_ = output_bytes(spec_);
    // the serialized fields: strings NUL-terminated, ints as int32, scale as float32
    for (const auto& f : kind_) {
      if (f.type == PluginFieldType::kCHAR) {
        strings_.push_back(attrs_.strings.at(f.name));
      } else if (f.type == PluginFieldType::kINT32) {
        ints_.push_back(int32_t(attrs_.ints.at(f.name)));
      }
    }
    scale_ = attrs_.floats.at("scale");
    size_t s = 0, i = 0;
    for (const auto& f : kind_) {
      if (f.type == PluginFieldType::kCHAR) {
        fields_.emplace_back(f.name, strings_[s].c_str(), f.type, int32_t(strings_[s].size() + 1));
        ++s;
      } else if (f.type == PluginFieldType::kINT32) {
        fields_.emplace_back(f.name, &ints_[i++], f.type, 1);
      } else {
        fields_.emplace_back(f.name, &scale_, f.type, 1);
      }
    }
    collection_.nbFields = int32_t(fields_.size());
    collection_.fields = fields_.data();
  }
  KVAttentionPlugin(const KVAttentionPlugin&) = delete;

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override {
    try {
      return new KVAttentionPlugin(kind_, attrs_, spec_);
    } catch (...) {
      return nullptr;
    }
  }

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override { return kind_.name; }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

  // IPluginV3OneBuild
  int32_t configurePlugin(const DynamicPluginTensorDesc*, int32_t, const DynamicPluginTensorDesc*, int32_t) noexcept override {
    return 0;
  }
  int32_t getNbOutputs() const noexcept override { return int32_t(out_bytes_.size()); }
  int32_t getOutputDataTypes(DataType* types, int32_t nb, const DataType*, int32_t) const noexcept override {
    if (nb != int32_t(out_bytes_.size())) return -1;
    for (int32_t i = 0; i < nb; ++i) types[i] = data_type(out_bytes_[size_t(i)]);
    return 0;
  }
  int32_t getOutputShapes(const DimsExprs* inputs, int32_t nb_inputs, const DimsExprs*, int32_t, DimsExprs* outputs,
                          int32_t nb_outputs, IExprBuilder& builder) noexcept override {
    if (nb_inputs != int32_t(in_bytes_.size()) || nb_outputs != int32_t(out_bytes_.size())) {
      log_error(std::string(kind_.name) + ": expected " + std::to_string(in_bytes_.size()) + " inputs for its schemes, got " +
                std::to_string(nb_inputs));
      return -1;
    }
    std::vector<std::vector<const IDimensionExpr*>> in;
    for (int32_t i = 0; i < nb_inputs; ++i) {
      if (inputs[i].nbDims != 4) return -1;
      in.push_back({inputs[i].d[0], inputs[i].d[1], inputs[i].d[2], inputs[i].d[3]});
    }
    ExprOps ops{builder};
    const auto out = output_dims(spec_, ops, in);
    for (int32_t i = 0; i < nb_outputs; ++i) {
      outputs[i].nbDims = 4;
      for (int k = 0; k < 4; ++k) outputs[i].d[k] = out[size_t(i)][size_t(k)];
    }
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, const DynamicPluginTensorDesc* io, int32_t nb_in, int32_t nb_out) noexcept override {
    const int bytes = pos < nb_in ? in_bytes_[size_t(pos)] : out_bytes_[size_t(pos - nb_in)];
    return io[pos].desc.format == TensorFormat::kLINEAR && io[pos].desc.type == data_type(bytes);
  }
  size_t getWorkspaceSize(const DynamicPluginTensorDesc* inputs, int32_t nb_inputs, const DynamicPluginTensorDesc*,
                          int32_t) const noexcept override {
    // upper bounds from the profile's maxima: batch, new positions, and past positions + new
    const int64_t batch = inputs[1].max.d[0], heads = inputs[1].max.d[1], added = inputs[1].max.d[2];
    int64_t past = 0;
    size_t index = 3;
    for (const StreamSpec* s : {&spec_.key, &spec_.value}) {
      int64_t stream_past = 0;
      for (int seg : s->segments) {
        if (index < size_t(nb_inputs)) stream_past += inputs[index].max.d[2];
        index += s->format(seg).parts.size();
      }
      past = std::max(past, stream_past);
    }
    return workspace_size(spec_, batch, heads, added, past + added);
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(const PluginTensorDesc*, int32_t, const PluginTensorDesc*, int32_t) noexcept override { return 0; }
  int32_t enqueue(const PluginTensorDesc* in_desc, const PluginTensorDesc*, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    try {
      std::vector<std::vector<int64_t>> dims;
      for (size_t i = 0; i < in_bytes_.size(); ++i) {
        const Dims& d = in_desc[i].dims;
        dims.push_back(std::vector<int64_t>(d.d, d.d + d.nbDims));
      }
      kvc_dev::Params params;
      std::string error;
      if (!make_params(spec_, dims, inputs, outputs, workspace, SIZE_MAX, &params, &error) ||
          !launch_on_gpu(params, stream, &error)) {
        log_error(error);
        return -1;
      }
      return 0;
    } catch (const std::exception& e) {
      log_error(std::string(kind_.name) + ": " + e.what());
      return -1;
    }
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  const PluginFieldCollection* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  const OpKind& kind_;
  kvc::Attributes attrs_;
  AttentionSpec spec_;
  std::vector<int> in_bytes_, out_bytes_;
  std::vector<std::string> strings_;
  std::vector<int32_t> ints_;
  float scale_ = 1.0f;
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};


class KVAttentionCreator : public IPluginCreatorV3One {
 public:
  explicit KVAttentionCreator(const OpKind& kind) : kind_(kind) {
    for (const auto& f : kind_) names_.emplace_back(f.name, nullptr, f.type, 0);
    collection_.nbFields = int32_t(names_.size());
    collection_.fields = names_.data();
  }
  IPluginV3* createPlugin(const char* name, const PluginFieldCollection* fc, TensorRTPhase) noexcept override {
    try {
      kvc::Attributes attrs;
      AttentionSpec spec;
      std::string error;
      if (!attributes_from_fields(kind_, fc, &attrs, &error) || !kind_.parse(attrs, &spec, &error)) {
        log_error(std::string(name ? name : kind_.name) + ": " + error);
        return nullptr;
      }
      return new KVAttentionPlugin(kind_, attrs, spec);
    } catch (const std::exception& e) {
      log_error(std::string(kind_.name) + ": " + e.what());
      return nullptr;
    }
  }
  const PluginFieldCollection* getFieldNames() noexcept override { return &collection_; }
  const char* getPluginName() const noexcept override { return kind_.name; }
  const char* getPluginVersion() const noexcept override { return kVersion; }
  const char* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  const OpKind& kind_;
  std::vector<PluginField> names_;
  PluginFieldCollection collection_{};
};

}  // namespace kvc_trt

// The entry points TensorRT looks for in a plugin library (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins / --staticPlugins, an engine's embedded plugin libraries).
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) {
  kvc_trt::g_logger_finder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& count) {
  static kvc_trt::KVAttentionCreator attention(kvc_trt::kAttention), window(kvc_trt::kWindowAttention);
  static IPluginCreatorInterface* const creators[] = {&attention, &window};
  count = 2;
  return creators;
}

// ---------------------------------------------------------------------------------------------
// A C API over the host logic, for tests through ctypes (no TensorRT needed): attributes are
// "name=value" lines; dims are 4 int64 per tensor; errors are one line in `error`.
namespace {

int report(const std::string& why, char* error, int error_len) {
  if (error && error_len > 0) {
    std::strncpy(error, why.c_str(), size_t(error_len - 1));
    error[error_len - 1] = '\0';
  }
  return 1;
}

// The op the attributes describe: KVWindowAttention when they name a window, else KVAttention.
const kvc_trt::OpKind& kind_of(const kvc::Attributes& attrs) {
  return attrs.ints.count("window") ? kvc_trt::kWindowAttention : kvc_trt::kAttention;
}

bool spec_of(const char* text, kvc::Attributes* attrs, kvc_trt::AttentionSpec* spec, std::string* error) {
  return kvc_trt::parse_attribute_text(text, attrs, error) && kind_of(*attrs).parse(*attrs, spec, error);
}

std::vector<std::vector<int64_t>> dims_of(int n, const int64_t* flat) {
  std::vector<std::vector<int64_t>> out;
  for (int i = 0; i < n; ++i) out.emplace_back(flat + 4 * i, flat + 4 * i + 4);
  return out;
}

}  // namespace

#define KVC_API extern "C" __attribute__((visibility("default")))

// Element bytes of each input and output (4 float32, 2 float16, 1 int8); counts in n_in / n_out.
KVC_API int kvc_trt_io(const char* attrs_text, int* n_in, int* in_bytes, int* n_out, int* out_bytes, int capacity,
                       char* error, int error_len) {
  kvc::Attributes attrs;
  kvc_trt::AttentionSpec spec;
  std::string why;
  if (!spec_of(attrs_text, &attrs, &spec, &why)) return report(why, error, error_len);
  const auto in = kvc_trt::input_bytes(spec), out = kvc_trt::output_bytes(spec);
  if (int(in.size()) > capacity || int(out.size()) > capacity) return report("too many ports", error, error_len);
  *n_in = int(in.size()), *n_out = int(out.size());
  std::copy(in.begin(), in.end(), in_bytes);
  std::copy(out.begin(), out.end(), out_bytes);
  return 0;
}

KVC_API int kvc_trt_output_dims(const char* attrs_text, int n_in, const int64_t* in_dims, int64_t* out_dims, char* error,
                                int error_len) {
  kvc::Attributes attrs;
  kvc_trt::AttentionSpec spec;
  std::string why;
  if (!spec_of(attrs_text, &attrs, &spec, &why)) return report(why, error, error_len);
  if (n_in != int(kvc_trt::input_bytes(spec).size())) return report("wrong number of inputs", error, error_len);
  kvc_trt::IntOps ops;
  const auto out = kvc_trt::output_dims(spec, ops, dims_of(n_in, in_dims));
  for (size_t i = 0; i < out.size(); ++i) std::copy(out[i].begin(), out[i].end(), out_dims + 4 * i);
  return 0;
}

// exact == 0: the bound getWorkspaceSize gives for these maxima; else what one such call uses.
KVC_API int64_t kvc_trt_workspace_size(const char* attrs_text, int64_t batch, int64_t heads, int64_t added, int64_t total,
                                       int exact) {
  kvc::Attributes attrs;
  kvc_trt::AttentionSpec spec;
  std::string why;
  if (!spec_of(attrs_text, &attrs, &spec, &why)) return -1;
  return int64_t(exact ? kvc_trt::workspace_used(spec, batch, heads, added, total)
                       : kvc_trt::workspace_size(spec, batch, heads, added, total));
}

// The plugin's build-time answer for input/output `pos` given its element bytes (and LINEAR format
// when linear != 0), through the plugin object TensorRT would get from the creator.
KVC_API int kvc_trt_supports(const char* attrs_text, int pos, int bytes, int linear) {
  kvc::Attributes attrs;
  kvc_trt::AttentionSpec spec;
  std::string why;
  if (!spec_of(attrs_text, &attrs, &spec, &why)) return -1;
  kvc_trt::KVAttentionPlugin plugin(kind_of(attrs), attrs, spec);
  const int n_in = int(kvc_trt::input_bytes(spec).size()), n_out = plugin.getNbOutputs();
  std::vector<DynamicPluginTensorDesc> io(size_t(n_in + n_out));
  for (auto& d : io) d.desc.format = TensorFormat::kLINEAR, d.desc.type = DataType::kFLOAT;
  io[size_t(pos)].desc.type = kvc_trt::data_type(bytes);
  io[size_t(pos)].desc.format = linear ? TensorFormat::kLINEAR : TensorFormat::kCHW32;
  return plugin.supportsFormatCombination(pos, io.data(), n_in, n_out) ? 1 : 0;
}

// Fields as the ONNX parser delivers them -> creator -> plugin -> getFieldsToSerialize ->
// creator (as engine deserialization does) -> fields again, written back as "name=value" lines.
KVC_API int kvc_trt_field_roundtrip(const char* attrs_text, char* out, int out_len, char* error, int error_len) {
  kvc::Attributes attrs;
  std::string why;
  if (!kvc_trt::parse_attribute_text(attrs_text, &attrs, &why)) return report(why, error, error_len);
  std::vector<std::string> strings;
  std::vector<int32_t> ints;
  std::vector<float> floats;
  strings.reserve(16), ints.reserve(16), floats.reserve(4);
  std::vector<PluginField> fields;
  const kvc_trt::OpKind& kind = kind_of(attrs);
  for (const auto& f : kind) {
    if (f.type == PluginFieldType::kCHAR) {
      strings.push_back(attrs.strings[f.name]);
      fields.emplace_back(f.name, strings.back().c_str(), f.type, int32_t(strings.back().size()));
    } else if (f.type == PluginFieldType::kINT32) {
      ints.push_back(int32_t(attrs.ints[f.name]));
      fields.emplace_back(f.name, &ints.back(), f.type, 1);
    } else {
      floats.push_back(attrs.floats[f.name]);
      fields.emplace_back(f.name, &floats.back(), f.type, 1);
    }
  }
  PluginFieldCollection fc{int32_t(fields.size()), fields.data()};
  int32_t count = 0;
  auto* creator = static_cast<IPluginCreatorV3One*>(getCreators(count)[&kind == &kvc_trt::kAttention ? 0 : 1]);
  std::unique_ptr<IPluginV3> built(creator->createPlugin("roundtrip", &fc, TensorRTPhase::kBUILD));
  if (!built) return report("the creator refused the fields", error, error_len);
  auto* runtime = static_cast<IPluginV3OneRuntime*>(built->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
  std::unique_ptr<IPluginV3> restored(creator->createPlugin("roundtrip", runtime->getFieldsToSerialize(), TensorRTPhase::kRUNTIME));
  if (!restored) return report("the creator refused the serialized fields", error, error_len);
  const PluginFieldCollection* again =
      static_cast<IPluginV3OneRuntime*>(restored->getCapabilityInterface(PluginCapabilityType::kRUNTIME))->getFieldsToSerialize();
  std::string text;
  for (int32_t i = 0; i < again->nbFields; ++i) {
    const PluginField& f = again->fields[i];
    text += std::string(f.name) + "=";
    if (f.type == PluginFieldType::kCHAR) text += static_cast<const char*>(f.data);
    else if (f.type == PluginFieldType::kINT32) text += std::to_string(*static_cast<const int32_t*>(f.data));
    else {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.9g", double(*static_cast<const float*>(f.data)));
      text += buf;
    }
    text += "\n";
  }
  if (int(text.size()) >= out_len) return report("output buffer too small", error, error_len);
  std::memcpy(out, text.c_str(), text.size() + 1);
  return 0;
}

// Run the GPU kernels' block programs on the CPU: inputs and outputs as the plugin's enqueue sees them.
KVC_API int kvc_trt_emulate(const char* attrs_text, int n_in, const int64_t* in_dims, const void* const* inputs,
                            void* const* outputs, char* error, int error_len) {
  try {
    kvc::Attributes attrs;
    kvc_trt::AttentionSpec spec;
    std::string why;
    if (!spec_of(attrs_text, &attrs, &spec, &why)) return report(why, error, error_len);
    const auto dims = dims_of(n_in, in_dims);
    if (n_in < 3) return report("KVAttention: expected query, key, value and the past parts", error, error_len);
    int64_t past = 0;
    size_t index = 3;
    for (int seg : spec.key.segments) {  // (a window's one segment holds its T rows)
      if (index < dims.size()) past += dims[index][2];
      index += spec.key.format(seg).parts.size();
    }
    const size_t bytes = kvc_trt::workspace_size(spec, dims[1][0], dims[1][1], dims[1][2], past + dims[1][2]);
    std::vector<uint8_t> workspace(bytes);
    kvc_dev::Params params;
    if (!kvc_trt::make_params(spec, dims, inputs, outputs, workspace.data(), bytes, &params, &why))
      return report(why, error, error_len);
    kvc_trt::run_on_host(params);
    if (*params.status) return report("KVAttention: a key or value is NaN, infinite or beyond its scheme's range", error, error_len);
    return 0;
  } catch (const std::exception& e) {
    return report(std::string("KVAttention: ") + e.what(), error, error_len);
  }
}

KVC_API const unsigned char* kvc_trt_fatbin(size_t* size) { return kvc_trt::fatbin_data(size); }

KVC_API size_t kvc_trt_params_size() { return sizeof(kvc_dev::Params); }

// The plugin's enqueue without TensorRT: inputs, outputs and workspace are device pointers, `stream`
// a CUstream (0: the default stream).  For bench/plugin_speed.py on a GPU.
KVC_API int kvc_trt_enqueue(const char* attrs_text, int n_in, const int64_t* in_dims, const void* const* inputs,
                            void* const* outputs, void* workspace, size_t workspace_bytes, void* stream, char* error,
                            int error_len) {
  try {
    kvc::Attributes attrs;
    kvc_trt::AttentionSpec spec;
    std::string why;
    if (!spec_of(attrs_text, &attrs, &spec, &why)) return report(why, error, error_len);
    kvc_dev::Params params;
    if (!kvc_trt::make_params(spec, dims_of(n_in, in_dims), inputs, outputs, workspace, workspace_bytes, &params, &why) ||
        !kvc_trt::launch_on_gpu(params, stream, &why))
      return report(why, error, error_len);
    return 0;
  } catch (const std::exception& e) {
    return report(std::string("KVAttention: ") + e.what(), error, error_len);
  }
}
