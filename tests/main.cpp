// Catch2's main, compiled once (without ISA flags) and linked into every test variant.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
