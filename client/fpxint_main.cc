// `fpxint`: the command-line client of the fpxint quantization service. This build has the
// offline `expand` command; it links the core library only (no LibTorch), so it starts fast.
#include <cstdio>

#include "CLI/CLI.hpp"
#include "client/exit_codes.h"
#include "client/expand_command.h"

int main(int argc, char** argv) {
  using namespace fpxint::client;
  CLI::App app(
      "fpxint — quantize neural networks with the FP=xINT low-bit series expansion.\n"
      "A weight tensor W becomes a sum of K low-bit terms s_k*(C_k - z_k); the error shrinks\n"
      "geometrically with every term, with no calibration data and no fine-tuning.",
      "fpxint");
  app.set_version_flag("--version", "fpxint 0.1.0");
  app.require_subcommand(1);
  GlobalOptions global;
  app.add_flag("--json", global.json, "Print machine-readable JSON on stdout")->configurable(false);
  app.add_flag("-q,--quiet", global.quiet, "No progress bar and no summary");
  app.fallthrough();
  int exit_code = kExitOk;
  AddExpandCommand(app, global, &exit_code);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  return exit_code;
}
