// djpq_vm_runner: load an exported TVM Relax VM library (.so), run "main" on raw input files, write
// the outputs as raw files. Built against the TVM 0.27 runtime and tvm-ffi 0.1.14 (C++ headers of
// the apache-tvm-ffi wheel only; libtvm_runtime.so registers the VM and the .so loader).
//
// Usage: djpq_vm_runner LIB.so OUT_DIR REPEATS IN0 [IN1 ...]
//   INi = PATH:DTYPE:D0xD1x...  (raw little-endian C-order bytes, e.g. x.bin:float32:1x3x8x8)
// Writes OUT_DIR/out<i>.bin for each (flattened) output and OUT_DIR/outputs.txt with one line per
// output: "<i> <dtype> <d0,d1,...>"; prints "seconds_per_run <s>" (mean of REPEATS runs).
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, ((n + 63) / 64) * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) parts.push_back(item);
  return parts;
}

ffi::Tensor ReadInput(const std::string& spec) {
  size_t c2 = spec.rfind(':');
  size_t c1 = spec.rfind(':', c2 - 1);
  if (c1 == std::string::npos || c2 == std::string::npos) {
    throw std::runtime_error("bad input spec (PATH:DTYPE:D0xD1...): " + spec);
  }
  std::string path = spec.substr(0, c1);
  DLDataType dtype = ffi::StringToDLDataType(spec.substr(c1 + 1, c2 - c1 - 1));
  std::vector<int64_t> shape;
  for (const auto& d : Split(spec.substr(c2 + 1), 'x')) shape.push_back(std::stoll(d));
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           dtype, cpu);
  size_t nbytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  std::ifstream in(path, std::ios::binary);
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes));
  if (!in || in.gcount() != static_cast<std::streamsize>(nbytes)) {
    throw std::runtime_error("cannot read " + std::to_string(nbytes) + " bytes from " + path);
  }
  return t;
}

void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *arr) Flatten(item, out);
  } else {
    throw std::runtime_error("unexpected VM output type " + value.GetTypeKey());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0] << " LIB.so OUT_DIR REPEATS PATH:DTYPE:D0xD1... [...]\n";
    return 2;
  }
  try {
    std::string out_dir = argv[2];
    int repeats = std::max(1, std::atoi(argv[3]));
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Optional<ffi::Function> load = lib->GetFunction("vm_load_executable", true);
    if (!load.has_value()) throw std::runtime_error("vm_load_executable missing: not a Relax VM library");
    ffi::Module vm = (*load)().cast<ffi::Module>();
    // (device type, device id, allocator) per device; kDLCPU, 0, pooled allocator (2).
    vm->GetFunction("vm_initialization", false).value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function run = vm->GetFunction("main", false).value();

    std::vector<ffi::Any> inputs;
    for (int i = 4; i < argc; ++i) inputs.emplace_back(ReadInput(argv[i]));
    std::vector<ffi::AnyView> views(inputs.begin(), inputs.end());

    ffi::Any result;
    auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < repeats; ++r) {
      run.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    }
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    std::vector<ffi::Tensor> outs;
    Flatten(result, &outs);
    std::ofstream manifest(out_dir + "/outputs.txt");
    for (size_t i = 0; i < outs.size(); ++i) {
      const ffi::Tensor& t = outs[i];
      if (t.device().device_type != kDLCPU || !t.IsContiguous()) {
        throw std::runtime_error("output " + std::to_string(i) + " is not a contiguous CPU tensor");
      }
      std::ofstream f(out_dir + "/out" + std::to_string(i) + ".bin", std::ios::binary);
      f.write(static_cast<const char*>(t.data_ptr()),
              static_cast<std::streamsize>(ffi::GetDataSize(*t.GetDLTensorPtr())));
      manifest << i << " " << std::string(ffi::DLDataTypeToString(t.dtype())) << " ";
      ffi::ShapeView shape = t.shape();
      for (size_t d = 0; d < shape.size(); ++d) manifest << (d ? "," : "") << shape[d];
      manifest << "\n";
    }
    std::cout << "seconds_per_run " << seconds / repeats << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "djpq_vm_runner: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
