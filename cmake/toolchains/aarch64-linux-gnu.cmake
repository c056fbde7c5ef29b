# Cross-compiling for 64-bit Arm Linux with Debian's GNU cross toolchain
# (g++-aarch64-linux-gnu); the binaries run under qemu's user-mode emulator
# (qemu-user), which CMake puts in front of every test through
# CMAKE_CROSSCOMPILING_EMULATOR. Used by scripts/run-tests-aarch64.sh:
#   cmake -S tests/aarch64 -B build/aarch64 \
#     -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(NORMKIT_AARCH64_TRIPLE aarch64-linux-gnu)
set(NORMKIT_AARCH64_SYSROOT /usr/${NORMKIT_AARCH64_TRIPLE})

set(CMAKE_C_COMPILER ${NORMKIT_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${NORMKIT_AARCH64_TRIPLE}-g++)

# qemu-aarch64 finds the target's dynamic loader and libraries (libstdc++, libc) under
# -L; the cross toolchain's packages install them there.
find_program(NORMKIT_QEMU_AARCH64 qemu-aarch64 REQUIRED)
set(CMAKE_CROSSCOMPILING_EMULATOR ${NORMKIT_QEMU_AARCH64} -L ${NORMKIT_AARCH64_SYSROOT})

# Libraries and packages come from the target's tree only; programs from the host's.
# Header-only dependencies (Eigen, Catch2) are the host's: tests/aarch64 names them by
# path, not through find_package.
set(CMAKE_FIND_ROOT_PATH ${NORMKIT_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
