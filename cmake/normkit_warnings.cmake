# Warning flags for normkit's own targets (tests, benches, examples), never pushed onto
# consumers through the INTERFACE target.
function(normkit_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wshadow -Wconversion)
  if(NORMKIT_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
