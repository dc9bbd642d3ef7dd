// File: client/expand_command.h
//
// `fpxint expand`: the offline tensor expansion of a safetensors file (links the core only).
#ifndef FPXINT_CLIENT_EXPAND_COMMAND_H_
#define FPXINT_CLIENT_EXPAND_COMMAND_H_

#include <string>

#include "CLI/CLI.hpp"
#include "client/options.h"

namespace fpxint::client {

// Adds the `expand` subcommand to `app`. After parsing, if the subcommand was chosen, the callback
// stores its exit code in *exit_code.
void AddExpandCommand(CLI::App& app, const GlobalOptions& global, int* exit_code);

}  // namespace fpxint::client

#endif  // FPXINT_CLIENT_EXPAND_COMMAND_H_
