# Use ccache when it is installed and the user has not chosen a launcher already.
if(NOT CMAKE_CXX_COMPILER_LAUNCHER)
  find_program(VALVE_CCACHE ccache)
  if(VALVE_CCACHE)
    set(CMAKE_CXX_COMPILER_LAUNCHER "${VALVE_CCACHE}")
  endif()
endif()
