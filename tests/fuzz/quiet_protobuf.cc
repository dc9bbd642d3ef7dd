// Linked into the fuzz targets that parse protobuf messages: protobuf logs every string field
// with invalid UTF-8 it refuses to parse, which is expected on fuzz input and would drown the
// fuzzer's own output.
#include <google/protobuf/stubs/logging.h>

#include <string>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(
      [](google::protobuf::LogLevel, const char*, int, const std::string&) {});
  return 0;
}
